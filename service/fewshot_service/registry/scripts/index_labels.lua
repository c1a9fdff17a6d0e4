-- Builds the label index (a sorted set of the label fields, all scored 0, so ZRANGEBYLEX walks
-- them in label order) of a namespace written before it existed, once, atomically: every class
-- of the counts hash, then state's label_index, from which the class scripts keep it in step.
-- KEYS: state, counts, label index
-- Returns the number of labels indexed (0 when it was already complete).
local state_key, counts_key, labels_key = unpack(KEYS, 1, 3)
if redis.call('HGET', state_key, 'label_index') then return 0 end
if redis.call('EXISTS', state_key) == 0 then return 0 end
local fields = redis.call('HKEYS', counts_key)
redis.call('DEL', labels_key)  -- whatever a script kept before the index was complete
-- ZADD in chunks: unpack() of a whole namespace's labels would overflow Lua's C stack.
local chunk = {}
for i, field in ipairs(fields) do
  chunk[#chunk + 1] = 0
  chunk[#chunk + 1] = field
  if #chunk >= 2000 or i == #fields then
    redis.call('ZADD', labels_key, unpack(chunk))
    chunk = {}
  end
end
redis.call('HSET', state_key, 'label_index', 1)
return #fields
