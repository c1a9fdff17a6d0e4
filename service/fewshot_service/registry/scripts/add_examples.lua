-- KEYS: state, counts, models, changes, images (of this class), then this model's counts,
-- prototypes, sums and embeddings (of this class), then the namespace's label index, then the
-- class's content hashes
-- ARGV: label field, model id, embedding dim, epoch, max examples per class, change log size,
-- then per example: its float32 blob, its stored image ('' when none is stored) and the sha256
-- of its uploaded file ('' when not recorded), which bulk import dedupes by (bulk.py). Recorded
-- here, with the example, so an entry never outlives or predates what it names.
-- Returns {generation, count, example id...}; refuses a dim other than the one this model id
-- was recorded with, and an add that would take the class over its cap (before changing anything).
-- Any model may add: the examples are the namespace's, the embeddings this model's.
-- The epoch is set once per namespace state: if Redis loses its data, the next epoch differs,
-- so no replica mistakes a restarted generation count for the one it cached.
local state_key, counts_key, models_key, changes_key, images_key = unpack(KEYS, 1, 5)
local mcounts_key, protos_key, sums_key, examples_key = unpack(KEYS, 6, 9)
local labels_key, hashes_key = KEYS[10], KEYS[11]
local field, model_id, dim, epoch = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local max_examples, log_size = tonumber(ARGV[5]), tonumber(ARGV[6])
local first = 7

if is_legacy(state_key) then return redis.error_reply('LEGACY') end
local recorded = redis.call('HGET', models_key, model_id)
if recorded and tonumber(recorded) ~= dim then
  return redis.error_reply('DIM_MISMATCH ' .. recorded)
end
local existing = redis.call('HLEN', images_key)
local adding = (#ARGV - first + 1) / 3
if existing + adding > max_examples then
  return redis.error_reply('TOO_MANY_EXAMPLES ' .. existing .. ' ' .. max_examples)
end
redis.call('HSET', models_key, model_id, dim)
if redis.call('HSETNX', state_key, 'epoch', epoch) == 1 then
  -- A new namespace: its label index starts complete (an older one is indexed once, labels.lua).
  if redis.call('HLEN', counts_key) == 0 then redis.call('HSET', state_key, 'label_index', 1) end
end
redis.call('HSET', state_key, 'layout', 2)

local embedded = redis.call('HLEN', examples_key)
local sum = load_sum(sums_key, examples_key, field, dim, embedded)
local current_epoch = redis.call('HGET', state_key, 'epoch')
local ids = {}
for i = first, #ARGV, 3 do
  local id = tostring(redis.call('HINCRBY', state_key, 'next_example_id', 1))
  redis.call('HSET', images_key, id, ARGV[i + 1])
  redis.call('HSET', examples_key, id, ARGV[i])
  if ARGV[i + 2] ~= '' then redis.call('HSET', hashes_key, ARGV[i + 2], current_epoch .. ':' .. id) end
  local v = unit_vector(ARGV[i], dim)
  for j = 1, dim do sum[j] = sum[j] + v[j] end
  ids[#ids + 1] = id
end
store_model_class(mcounts_key, protos_key, sums_key, examples_key, field, sum, embedded + adding, dim)
redis.call('HSET', counts_key, field, existing + adding)
redis.call('ZADD', labels_key, 0, field)
redis.call('HINCRBY', state_key, 'examples', adding)
redis.call('HINCRBY', state_key, 'n:' .. model_id, adding)
local generation = bump_generation(state_key, changes_key, field, log_size)
local reply = {generation, existing + adding}
for _, id in ipairs(ids) do reply[#reply + 1] = id end
return reply
