-- KEYS: state, counts, models, changes, images (of this class), label index, content hashes (of
-- this class), then per model: its counts, prototypes, sums and embeddings (of this class)
-- ARGV: label field, example id, change log size, then the model ids, in the order of their keys.
-- Returns {generation, remaining count}. Refuses (CHANGED) when the namespace's models are not
-- the ones passed, so no model keeps an embedding of a deleted example.
-- Each model's sum loses that model's unit vector of the example: O(dim), not O(class).
local state_key, counts_key, models_key, changes_key, images_key, labels_key, hashes_key = unpack(KEYS, 1, 7)
local field, example_id, log_size = ARGV[1], ARGV[2], tonumber(ARGV[3])
local model_ids = {unpack(ARGV, 4)}
if is_legacy(state_key) then return redis.error_reply('LEGACY') end
if not models_match(models_key, model_ids) then return redis.error_reply('CHANGED') end
if redis.call('HEXISTS', counts_key, field) == 0 then
  return redis.error_reply('NO_CLASS')
end
if redis.call('HEXISTS', images_key, example_id) == 0 then
  return redis.error_reply('NO_EXAMPLE')
end
for i, model_id in ipairs(model_ids) do
  local mcounts_key, protos_key, sums_key, examples_key = unpack(KEYS, 8 + (i - 1) * 4, 11 + (i - 1) * 4)
  local blob = redis.call('HGET', examples_key, example_id)
  if blob then
    local dim = tonumber(redis.call('HGET', models_key, model_id))
    local n = redis.call('HLEN', examples_key)
    local sum = load_sum(sums_key, examples_key, field, dim, n)
    redis.call('HDEL', examples_key, example_id)
    local v = unit_vector(blob, dim)
    for j = 1, dim do sum[j] = sum[j] - v[j] end
    store_model_class(mcounts_key, protos_key, sums_key, examples_key, field, sum, n - 1, dim)
    redis.call('HINCRBY', state_key, 'n:' .. model_id, -1)
  end
  forget_model_if_unused(models_key, state_key, model_id)
end
redis.call('HDEL', images_key, example_id)
local count = redis.call('HLEN', images_key)
if count == 0 then
  redis.call('HDEL', counts_key, field)
  redis.call('ZREM', labels_key, field)
  redis.call('DEL', hashes_key)
else
  forget_content_hashes(hashes_key, state_key, example_id)
  redis.call('HSET', counts_key, field, count)
end
redis.call('HINCRBY', state_key, 'examples', -1)
forget_models_if_empty(counts_key, models_key, state_key, model_ids)
local generation = bump_generation(state_key, changes_key, field, log_size)
return {generation, count}
