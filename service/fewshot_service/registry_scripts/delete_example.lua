-- KEYS: model, state, counts, prototypes, examples (of this class), sums, changes
-- ARGV: label field, example id, change log size. Returns {generation, remaining count}.
-- The removed example's unit vector is subtracted from the class's sum: O(dim), not O(class).
local model_key, state_key, counts_key, protos_key, examples_key, sums_key, changes_key = unpack(KEYS)
local field, example_id, log_size = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('HEXISTS', counts_key, field) == 0 then
  return redis.error_reply('NO_CLASS')
end
local blob = redis.call('HGET', examples_key, example_id)
if not blob then
  return redis.error_reply('NO_EXAMPLE')
end
local dim = tonumber(redis.call('HGET', model_key, 'dim'))
local count = redis.call('HLEN', examples_key)
local sum = load_sum(sums_key, examples_key, field, dim, count)
redis.call('HDEL', examples_key, example_id)
local v = unit_vector(blob, dim)
for i = 1, dim do sum[i] = sum[i] - v[i] end
count = store_class(model_key, counts_key, protos_key, examples_key, sums_key, field, sum, count - 1, dim)
local generation = bump_generation(state_key, changes_key, field, log_size)
return {generation, count}
