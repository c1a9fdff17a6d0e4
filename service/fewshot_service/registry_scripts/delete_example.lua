-- KEYS: model, state, counts, prototypes, examples (of this class)
-- ARGV: label field, example id. Returns {generation, remaining count}.
local model_key, state_key, counts_key, protos_key, examples_key = unpack(KEYS)
local field, example_id = ARGV[1], ARGV[2]
if redis.call('HEXISTS', counts_key, field) == 0 then
  return redis.error_reply('NO_CLASS')
end
if redis.call('HDEL', examples_key, example_id) == 0 then
  return redis.error_reply('NO_EXAMPLE')
end
local dim = tonumber(redis.call('HGET', model_key, 'dim'))
local count = store_class(model_key, counts_key, protos_key, examples_key, field, dim)
local generation = redis.call('HINCRBY', state_key, 'generation', 1)
return {generation, count}
