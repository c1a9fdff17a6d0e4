-- KEYS: model, state, counts, prototypes, examples (of this class), sums, changes
-- ARGV: label field, change log size. Returns the new generation.
local model_key, state_key, counts_key, protos_key, examples_key, sums_key, changes_key = unpack(KEYS)
local field, log_size = ARGV[1], tonumber(ARGV[2])
if redis.call('HEXISTS', counts_key, field) == 0 then
  return redis.error_reply('NO_CLASS')
end
store_class(model_key, counts_key, protos_key, examples_key, sums_key, field, {}, 0, 0)
return bump_generation(state_key, changes_key, field, log_size)
