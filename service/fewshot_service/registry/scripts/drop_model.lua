-- KEYS: state, models, this model's counts, prototypes, sums, backfill lease and record, then
-- its embeddings of each class it holds
-- ARGV: model id, then the label fields of those classes (this model's counts hash).
-- Forgets every embedding of one model in the namespace (the examples and their images stay,
-- so the model can be backfilled again). Returns the number of embeddings dropped.
-- CHANGED when the model's classes are not the ones passed. Every replica reloads in full once
-- (the log restarts here): a model's rows vanish without a per-label record.
local state_key, models_key, mcounts_key = unpack(KEYS, 1, 3)
local model_id = ARGV[1]
if is_legacy(state_key) then return redis.error_reply('LEGACY') end
if not fields_if_exactly(mcounts_key, ARGV, 2, #ARGV) then return redis.error_reply('CHANGED') end
local dropped = tonumber(redis.call('HGET', state_key, 'n:' .. model_id)) or 0
local known = redis.call('HEXISTS', models_key, model_id) == 1
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
if not known and dropped == 0 then return 0 end
redis.call('HDEL', models_key, model_id)
redis.call('HDEL', state_key, 'n:' .. model_id)
local generation = redis.call('HINCRBY', state_key, 'generation', 1)
redis.call('HSET', state_key, 'log_start', generation, 'logged', generation)
return dropped
