-- KEYS: model, state, counts, prototypes, examples (of this class), sums
-- ARGV: label field. Returns the new generation.
local model_key, state_key, counts_key, protos_key, examples_key, sums_key = unpack(KEYS)
local field = ARGV[1]
if redis.call('HEXISTS', counts_key, field) == 0 then
  return redis.error_reply('NO_CLASS')
end
store_class(model_key, counts_key, protos_key, examples_key, sums_key, field, {}, 0, 0)
return redis.call('HINCRBY', state_key, 'generation', 1)
