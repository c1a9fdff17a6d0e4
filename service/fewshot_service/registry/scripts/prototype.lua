-- Shared prelude, prepended to each registry script by registry.py.
-- Embeddings are little-endian float32 blobs; a prototype is the mean of the L2-normalised
-- embeddings of a class. Embeddings, sums and prototypes are kept per model id (keys under
-- {ns}:m:<model hex>:), so replicas of two models can serve one namespace side by side; the
-- examples themselves (ids, stored images, counts) are the namespace's, whatever the model.
-- Each class keeps, per model, the running sum of its unit vectors (float64, in that model's
-- sums hash, with the example count it covers under '<field>:n'), so an add or a delete costs
-- O(changed examples x dim), not O(class size). A sum that is missing or covers another count
-- is recomputed once from that model's embeddings.

local function unit_vector(blob, dim)
  local v = {struct.unpack('<' .. string.rep('f', dim), blob)}
  local squares = 0.0
  for i = 1, dim do squares = squares + v[i] * v[i] end
  local norm = math.sqrt(squares)
  for i = 1, dim do v[i] = v[i] / norm end
  return v
end

local function recompute_sum(examples_key, dim)
  local sum = {}
  for i = 1, dim do sum[i] = 0.0 end
  for _, blob in ipairs(redis.call('HVALS', examples_key)) do
    local v = unit_vector(blob, dim)
    for i = 1, dim do sum[i] = sum[i] + v[i] end
  end
  return sum
end

-- The class's sum of unit vectors (of one model) while it holds `count` of them.
local function load_sum(sums_key, examples_key, field, dim, count)
  local stored = redis.call('HMGET', sums_key, field, field .. ':n')
  if stored[1] and tonumber(stored[2]) == count then
    local sum = {struct.unpack('<' .. string.rep('d', dim), stored[1])}
    sum[dim + 1] = nil  -- struct.unpack also returns the next read position
    return sum
  end
  return recompute_sum(examples_key, dim)
end

-- Stores one model's count, sum and prototype (sum / count) of a class, or forgets the class
-- for that model when it holds none of its embeddings.
local function store_model_class(mcounts_key, protos_key, sums_key, examples_key, field, sum, count, dim)
  if count == 0 then
    redis.call('HDEL', mcounts_key, field)
    redis.call('HDEL', protos_key, field)
    redis.call('HDEL', sums_key, field, field .. ':n')
    redis.call('DEL', examples_key)
  else
    local mean = {}
    for i = 1, dim do mean[i] = sum[i] / count end
    redis.call('HSET', mcounts_key, field, count)
    redis.call('HSET', protos_key, field, struct.pack('<' .. string.rep('f', dim), unpack(mean, 1, dim)))
    redis.call('HSET', sums_key, field, struct.pack('<' .. string.rep('d', dim), unpack(sum, 1, dim)),
      field .. ':n', count)
  end
  return count
end

-- A namespace written by the scripts before per-model keys (state without 'layout') must be
-- migrated first (migrate_layout.lua); the caller does that and retries.
local function is_legacy(state_key)
  return redis.call('HEXISTS', state_key, 'epoch') == 1 and not redis.call('HGET', state_key, 'layout')
end

-- The fields of hash `key` when they are exactly wanted[first..last] (what the caller read and
-- passed the keys of), else nil: a script refuses (CHANGED) rather than miss something added in
-- between. Indices, not unpack(): a namespace's labels can outnumber Lua's C stack.
local function fields_if_exactly(key, wanted, first, last)
  local fields = redis.call('HKEYS', key)
  if #fields ~= last - first + 1 then return nil end
  local expected = {}
  for i = first, last do expected[wanted[i]] = true end
  for _, field in ipairs(fields) do
    if not expected[field] then return nil end
  end
  return fields
end

-- True when the models hash names exactly `ids` (the models whose keys the caller passed).
local function models_match(models_key, ids)
  return fields_if_exactly(models_key, ids, 1, #ids) ~= nil
end

-- A model left with no embedding in the namespace is forgotten there (not listed as 0 of n).
local function forget_model_if_unused(models_key, state_key, model_id)
  if (tonumber(redis.call('HGET', state_key, 'n:' .. model_id)) or 0) <= 0 then
    redis.call('HDEL', models_key, model_id)
    redis.call('HDEL', state_key, 'n:' .. model_id)
  end
end

-- An empty namespace forgets its models, so no completeness is reported for nothing.
local function forget_models_if_empty(counts_key, models_key, state_key, model_ids)
  if redis.call('HLEN', counts_key) == 0 then
    redis.call('DEL', models_key)
    for _, id in ipairs(model_ids) do redis.call('HDEL', state_key, 'n:' .. id) end
    redis.call('HSET', state_key, 'examples', 0)
  end
end

-- Bumps the namespace's generation and records that `field` changed at it in the change log (a
-- sorted set: label -> generation of its last change), so a replica holding generation g fetches
-- only the classes changed after g. The log keeps the latest `log_size` labels; state's
-- 'log_start' is the generation from which it is complete ('logged' the last one it holds:
-- a write by a script from before the log existed leaves logged behind generation).
local function bump_generation(state_key, changes_key, field, log_size)
  local state = redis.call('HMGET', state_key, 'generation', 'logged')
  local previous = tonumber(state[1]) or 0
  if (tonumber(state[2]) or 0) ~= previous then
    redis.call('HSET', state_key, 'log_start', previous)  -- changes before this one are unlogged
  end
  local generation = redis.call('HINCRBY', state_key, 'generation', 1)
  redis.call('ZADD', changes_key, generation, field)
  local excess = redis.call('ZCARD', changes_key) - log_size
  if excess > 0 then
    local newest_dropped = redis.call('ZRANGE', changes_key, excess - 1, excess - 1, 'WITHSCORES')
    redis.call('ZREMRANGEBYRANK', changes_key, 0, excess - 1)
    redis.call('HSET', state_key, 'log_start', newest_dropped[2])
  end
  redis.call('HSET', state_key, 'logged', generation)
  return generation
end

-- Drops the content hashes (bulk import's dedupe, bulk.py) that name `example_id` in this epoch:
-- one pass over the class's entries, which its cap on examples bounds.
local function forget_content_hashes(hashes_key, state_key, example_id)
  local wanted = (redis.call('HGET', state_key, 'epoch') or '') .. ':' .. example_id
  local entries = redis.call('HGETALL', hashes_key)
  for i = 1, #entries, 2 do
    if entries[i + 1] == wanted then redis.call('HDEL', hashes_key, entries[i]) end
  end
end
