-- KEYS: state, counts, models, changes, images (of this class), label index, content hashes (of
-- this class), then per model: its counts, prototypes, sums and embeddings (of this class)
-- ARGV: label field, change log size, then the model ids, in the order of their keys.
-- Returns the new generation; CHANGED when the namespace's models are not the ones passed.
local state_key, counts_key, models_key, changes_key, images_key, labels_key, hashes_key = unpack(KEYS, 1, 7)
local field, log_size = ARGV[1], tonumber(ARGV[2])
local model_ids = {unpack(ARGV, 3)}
if is_legacy(state_key) then return redis.error_reply('LEGACY') end
if not models_match(models_key, model_ids) then return redis.error_reply('CHANGED') end
if redis.call('HEXISTS', counts_key, field) == 0 then
  return redis.error_reply('NO_CLASS')
end
for i, model_id in ipairs(model_ids) do
  local mcounts_key, protos_key, sums_key, examples_key = unpack(KEYS, 8 + (i - 1) * 4, 11 + (i - 1) * 4)
  local n = redis.call('HLEN', examples_key)
  if n > 0 then redis.call('HINCRBY', state_key, 'n:' .. model_id, -n) end
  store_model_class(mcounts_key, protos_key, sums_key, examples_key, field, {}, 0, 0)
  forget_model_if_unused(models_key, state_key, model_id)
end
local count = redis.call('HLEN', images_key)
redis.call('DEL', images_key, hashes_key)
redis.call('HDEL', counts_key, field)
redis.call('ZREM', labels_key, field)
redis.call('HINCRBY', state_key, 'examples', -count)
forget_models_if_empty(counts_key, models_key, state_key, model_ids)
return bump_generation(state_key, changes_key, field, log_size)
