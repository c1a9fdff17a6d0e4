-- KEYS: model, state, counts, prototypes, examples (of this class), sums, changes
-- ARGV: label field, model id, embedding dim, epoch, max examples per class, change log size,
-- then one float32 blob per example.
-- Returns {generation, count, example id...}; refuses a model or dim other than the namespace's,
-- and an add that would take the class over its example cap (before changing anything).
-- The epoch is set once per namespace state: if Redis loses its data, the next epoch differs,
-- so no replica mistakes a restarted generation count for the one it cached.
local model_key, state_key, counts_key, protos_key, examples_key, sums_key, changes_key = unpack(KEYS)
local field, model_id, dim, epoch = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local max_examples, log_size = tonumber(ARGV[5]), tonumber(ARGV[6])
local first_blob = 7

local recorded = redis.call('HMGET', model_key, 'model_id', 'dim')
if recorded[1] and recorded[1] ~= model_id then
  return redis.error_reply('MODEL_MISMATCH ' .. recorded[1])
end
if recorded[2] and tonumber(recorded[2]) ~= dim then
  return redis.error_reply('DIM_MISMATCH ' .. recorded[2])
end
local existing = redis.call('HLEN', examples_key)
local adding = #ARGV - first_blob + 1
if existing + adding > max_examples then
  return redis.error_reply('TOO_MANY_EXAMPLES ' .. existing .. ' ' .. max_examples)
end
redis.call('HSET', model_key, 'model_id', model_id, 'dim', dim)
redis.call('HSETNX', state_key, 'epoch', epoch)

local sum = load_sum(sums_key, examples_key, field, dim, existing)
local ids = {}
for i = first_blob, #ARGV do
  local id = tostring(redis.call('HINCRBY', state_key, 'next_example_id', 1))
  redis.call('HSET', examples_key, id, ARGV[i])
  local v = unit_vector(ARGV[i], dim)
  for j = 1, dim do sum[j] = sum[j] + v[j] end
  ids[#ids + 1] = id
end
local count = store_class(model_key, counts_key, protos_key, examples_key, sums_key, field, sum,
  existing + adding, dim)
local generation = bump_generation(state_key, changes_key, field, log_size)
local reply = {generation, count}
for _, id in ipairs(ids) do reply[#reply + 1] = id end
return reply
