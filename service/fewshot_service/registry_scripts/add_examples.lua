-- KEYS: model, state, counts, prototypes, examples (of this class)
-- ARGV: label field, model id, embedding dim, epoch, then one float32 blob per example
-- Returns {generation, count, example id...}; refuses a model or dim other than the namespace's.
-- The epoch is set once per namespace state: if Redis loses its data, the next epoch differs,
-- so no replica mistakes a restarted generation count for the one it cached.
local model_key, state_key, counts_key, protos_key, examples_key = unpack(KEYS)
local field, model_id, dim, epoch = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

local recorded = redis.call('HMGET', model_key, 'model_id', 'dim')
if recorded[1] and recorded[1] ~= model_id then
  return redis.error_reply('MODEL_MISMATCH ' .. recorded[1])
end
if recorded[2] and tonumber(recorded[2]) ~= dim then
  return redis.error_reply('DIM_MISMATCH ' .. recorded[2])
end
redis.call('HSET', model_key, 'model_id', model_id, 'dim', dim)
redis.call('HSETNX', state_key, 'epoch', epoch)

local ids = {}
for i = 5, #ARGV do
  local id = tostring(redis.call('HINCRBY', state_key, 'next_example_id', 1))
  redis.call('HSET', examples_key, id, ARGV[i])
  ids[#ids + 1] = id
end
local count = store_class(model_key, counts_key, protos_key, examples_key, field, dim)
local generation = redis.call('HINCRBY', state_key, 'generation', 1)
local reply = {generation, count}
for _, id in ipairs(ids) do reply[#reply + 1] = id end
return reply
