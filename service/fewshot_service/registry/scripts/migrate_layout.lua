-- Moves a namespace written before per-model keys to the current layout, once, atomically:
-- its embeddings become those of the model it recorded (no stored images: such examples are
-- served by that model as before, and need re-upload for another one).
-- KEYS: state, legacy model, counts, legacy prototypes, legacy sums, models, then the recorded
-- model's counts, prototypes, sums, the label index, then per class: legacy embeddings, images,
-- new embeddings
-- ARGV: the recorded model id ('' when none), then the label fields of the classes.
-- Returns 1 when migrated, 0 when already done; CHANGED when the classes or model read differ.
local state_key, legacy_model_key, counts_key, legacy_protos, legacy_sums, models_key = unpack(KEYS, 1, 6)
local mcounts_key, protos_key, sums_key, labels_key = unpack(KEYS, 7, 10)
if not is_legacy(state_key) then return 0 end
local model_id = ARGV[1]
local recorded = redis.call('HMGET', legacy_model_key, 'model_id', 'dim')
if (recorded[1] or '') ~= model_id then return redis.error_reply('CHANGED') end
if not fields_if_exactly(counts_key, ARGV, 2, #ARGV) then return redis.error_reply('CHANGED') end
local total = 0
for i = 2, #ARGV do
  local field = ARGV[i]
  local base = 11 + (i - 2) * 3
  local legacy_examples, images_key, examples_key = KEYS[base], KEYS[base + 1], KEYS[base + 2]
  local ids = redis.call('HKEYS', legacy_examples)
  for _, id in ipairs(ids) do redis.call('HSET', images_key, id, '') end
  if #ids > 0 then
    redis.call('RENAME', legacy_examples, examples_key)
    redis.call('HSET', counts_key, field, #ids)
    redis.call('HSET', mcounts_key, field, #ids)
    redis.call('ZADD', labels_key, 0, field)
  else
    redis.call('HDEL', counts_key, field)
  end
  total = total + #ids
end
if model_id ~= '' and total > 0 then
  if redis.call('EXISTS', legacy_protos) == 1 then redis.call('RENAME', legacy_protos, protos_key) end
  if redis.call('EXISTS', legacy_sums) == 1 then redis.call('RENAME', legacy_sums, sums_key) end
  redis.call('HSET', models_key, model_id, recorded[2])
  redis.call('HSET', state_key, 'n:' .. model_id, total)
else
  redis.call('DEL', legacy_protos, legacy_sums)
end
redis.call('DEL', legacy_model_key)
redis.call('HSET', state_key, 'layout', 2, 'examples', total, 'label_index', 1)
return 1
