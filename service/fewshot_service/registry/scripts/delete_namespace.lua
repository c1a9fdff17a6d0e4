-- KEYS: state, counts, models, changes, then every other key of the namespace (its label index;
-- images and content hashes of each class; per model its counts, prototypes, sums, backfill lease and record, and embeddings of
-- each class)
-- ARGV: the number of classes, their label fields, then the model ids.
-- Removes the whole namespace, state included: the next add starts a new epoch, so every
-- replica's cached copy stops matching and is dropped. Refuses (CHANGED) when the classes or
-- models are no longer the ones the caller read, so nothing added in between is left behind.
-- Returns {classes deleted, examples deleted}.
local state_key, counts_key, models_key = unpack(KEYS, 1, 3)
if is_legacy(state_key) then return redis.error_reply('LEGACY') end
local n_classes = tonumber(ARGV[1])
local fields = fields_if_exactly(counts_key, ARGV, 2, n_classes + 1)
if not fields then return redis.error_reply('CHANGED') end
local examples = 0
for _, field in ipairs(fields) do
  examples = examples + tonumber(redis.call('HGET', counts_key, field))
end
if not models_match(models_key, {unpack(ARGV, n_classes + 2)}) then
  return redis.error_reply('CHANGED')
end
for i = 1, #KEYS do redis.call('DEL', KEYS[i]) end
return {#fields, examples}
