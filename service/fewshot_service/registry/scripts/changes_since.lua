-- KEYS: state, changes, prototypes (of the model the replica serves)
-- ARGV: the epoch and generation a replica holds, the most changed classes worth patching.
-- Returns {epoch, generation, 'patch', label, prototype or false (deleted, or none for this
-- model), ...} when the change log covers every change since that generation, else {epoch,
-- generation, 'reload'}: the epoch changed (Redis lost data), the generation went back, the log
-- was trimmed past it, a write went unlogged, or so many classes changed that a full reload is
-- cheaper. One script, so the state and the prototypes it returns come from the same instant.
local state_key, changes_key, protos_key = unpack(KEYS)
local held_epoch, held, max_changes = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', state_key, 'epoch', 'generation', 'log_start', 'logged')
local generation = tonumber(state[2]) or 0
local reply = {state[1] or '', generation}
if state[1] ~= held_epoch or generation < held or (tonumber(state[3]) or 0) > held
    or (tonumber(state[4]) or 0) ~= generation then
  reply[3] = 'reload'
  return reply
end
local labels = redis.call('ZRANGEBYSCORE', changes_key, '(' .. held, '+inf', 'LIMIT', 0, max_changes + 1)
if #labels > max_changes then
  reply[3] = 'reload'
  return reply
end
reply[3] = 'patch'
if #labels > 0 then
  local protos = redis.call('HMGET', protos_key, unpack(labels))
  for i, label in ipairs(labels) do
    reply[#reply + 1] = label
    reply[#reply + 1] = protos[i]
  end
end
return reply
