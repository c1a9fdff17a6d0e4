-- Shared prelude, prepended to each registry script by registry.py.
-- Embeddings are little-endian float32 blobs; a prototype is the mean of the L2-normalised
-- embeddings of a class, recomputed from every stored example so it never drifts.

local function recompute_prototype(examples_key, dim)
  local blobs = redis.call('HVALS', examples_key)
  local n = #blobs
  if n == 0 then
    return nil, 0
  end
  local fmt = '<' .. string.rep('f', dim)
  local sum = {}
  for i = 1, dim do sum[i] = 0.0 end
  for _, blob in ipairs(blobs) do
    local v = {struct.unpack(fmt, blob)}
    local squares = 0.0
    for i = 1, dim do squares = squares + v[i] * v[i] end
    local norm = math.sqrt(squares)
    for i = 1, dim do sum[i] = sum[i] + v[i] / norm end
  end
  for i = 1, dim do sum[i] = sum[i] / n end
  return struct.pack(fmt, unpack(sum)), n
end

-- Stores the class's new prototype and count, or forgets the class when no example is left;
-- an empty namespace forgets its model too, so another model may start it afresh.
local function store_class(model_key, counts_key, protos_key, examples_key, field, dim)
  local prototype, count = recompute_prototype(examples_key, dim)
  if count == 0 then
    redis.call('HDEL', counts_key, field)
    redis.call('HDEL', protos_key, field)
    redis.call('DEL', examples_key)
    if redis.call('HLEN', counts_key) == 0 then
      redis.call('DEL', model_key)
    end
  else
    redis.call('HSET', counts_key, field, count)
    redis.call('HSET', protos_key, field, prototype)
  end
  return count
end
