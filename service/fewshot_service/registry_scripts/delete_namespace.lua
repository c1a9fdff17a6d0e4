-- KEYS: model, state, counts, prototypes, sums, changes, then the examples hash of every class
-- ARGV: the label field of every class, in the order of their examples keys.
-- Removes the whole namespace, state included: the next add starts a new epoch, so every
-- replica's cached copy stops matching and is dropped. Refuses (CHANGED) when the classes are no
-- longer the ones the caller read, so no class added in between is left half-deleted.
-- Returns {classes deleted, examples deleted}.
local model_key, state_key, counts_key, protos_key, sums_key, changes_key = unpack(KEYS, 1, 6)
local fields = redis.call('HKEYS', counts_key)
if #fields ~= #ARGV then
  return redis.error_reply('CHANGED')
end
local expected = {}
for _, field in ipairs(ARGV) do expected[field] = true end
local examples = 0
for _, field in ipairs(fields) do
  if not expected[field] then
    return redis.error_reply('CHANGED')
  end
  examples = examples + tonumber(redis.call('HGET', counts_key, field))
end
for i = 7, #KEYS do redis.call('DEL', KEYS[i]) end
for i = 1, 6 do redis.call('DEL', KEYS[i]) end
return {#fields, examples}
