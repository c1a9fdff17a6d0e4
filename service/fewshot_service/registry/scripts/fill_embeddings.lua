-- Backfill: one model's embeddings of examples that another model added, computed from their
-- stored images.
-- KEYS: state, counts, models, changes, this model's counts, prototypes, sums, then per class:
-- its images and this model's embeddings of it
-- ARGV: model id, dim, epoch, change log size, then per class: label field, k, and k pairs
-- (example id, float32 blob).
-- An example deleted meanwhile (or a class, or the whole namespace: another epoch) is skipped,
-- and so is one this model has embedded meanwhile (another request filled it). Returns the
-- number of embeddings written; each changed class is logged, so replicas patch it.
local state_key, counts_key, models_key, changes_key = unpack(KEYS, 1, 4)
local mcounts_key, protos_key, sums_key = unpack(KEYS, 5, 7)
local model_id, dim, epoch, log_size = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
if is_legacy(state_key) then return redis.error_reply('LEGACY') end
if redis.call('HGET', state_key, 'epoch') ~= epoch then return 0 end
local recorded = redis.call('HGET', models_key, model_id)
if recorded and tonumber(recorded) ~= dim then
  return redis.error_reply('DIM_MISMATCH ' .. recorded)
end
local filled_total = 0
local pos, key = 5, 8
while pos <= #ARGV do
  local field, k = ARGV[pos], tonumber(ARGV[pos + 1])
  local images_key, examples_key = KEYS[key], KEYS[key + 1]
  if redis.call('HEXISTS', counts_key, field) == 1 then
    local n = redis.call('HLEN', examples_key)
    local sum = load_sum(sums_key, examples_key, field, dim, n)
    local filled = 0
    for j = 0, k - 1 do
      local id, blob = ARGV[pos + 2 + 2 * j], ARGV[pos + 3 + 2 * j]
      if redis.call('HEXISTS', images_key, id) == 1 and redis.call('HEXISTS', examples_key, id) == 0 then
        redis.call('HSET', examples_key, id, blob)
        local v = unit_vector(blob, dim)
        for i = 1, dim do sum[i] = sum[i] + v[i] end
        filled = filled + 1
      end
    end
    if filled > 0 then
      store_model_class(mcounts_key, protos_key, sums_key, examples_key, field, sum, n + filled, dim)
      bump_generation(state_key, changes_key, field, log_size)
      filled_total = filled_total + filled
    end
  end
  pos = pos + 2 + 2 * k
  key = key + 2
end
if filled_total > 0 then
  redis.call('HSET', models_key, model_id, dim)
  redis.call('HINCRBY', state_key, 'n:' .. model_id, filled_total)
end
return filled_total
