-- KEYS: the lease. ARGV: 'renew' or 'release', the holder's token, the lease time in ms.
-- Renews or releases the lease only while the caller holds it (compare-and-set on the token),
-- so a worker whose lease expired and was taken over never extends or frees the new holder's.
-- Returns 1 when done, 0 when the lease is not (or no longer) the caller's.
local lease_key = KEYS[1]
local action, token, ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('GET', lease_key) ~= token then return 0 end
if action == 'release' then
  redis.call('DEL', lease_key)
else
  redis.call('PEXPIRE', lease_key, ms)
end
return 1
