-- store.lua — one partition batch, applied atomically (see store.h and store.c).
--
-- KEYS[1]             pql:{g:p}:meta    (epoch, seq, off:<topic>)
-- KEYS[2]             pql:{g:p}:outbox
-- KEYS[3 .. 2+nc]     pql:{g:p}:c:<name>  counter hashes
-- KEYS[3+nc .. 2+nc+na]  pql:{g:p}:a:<id>  account hashes (one entry per
--                     pql_store_batch_account() call, in call order)
--
-- ARGV (all integers in decimal):
--   epoch, seq, nc, na, noff, nput, ndel,
--   noff x (meta field "off:<topic>", next offset),
--   nput x (alert id, payload), ndel x alert id,
--   per counter hash: n, then n x (field, delta),
--   per account: ttl_ms, nruns, then per run a signed count r followed by
--     r x (field, value) to HSET when r > 0, or -r fields to HDEL when r < 0
--     (runs keep the caller's order of sets and deletes).
--
-- Replies: 1 applied, 0 already applied (stored seq == seq+1: a retry after a
-- lost reply), or an error "FENCED epoch ..." / "FENCED seq ..." with nothing
-- written (a partition never claimed has no epoch and fences every batch).
-- Every check happens before the first write.

local meta = KEYS[1]
local epoch, seq = ARGV[1], ARGV[2]
local nc, na = tonumber(ARGV[3]), tonumber(ARGV[4])
local noff, nput, ndel = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])

local state = redis.call('HMGET', meta, 'epoch', 'seq')
local stored_epoch = state[1] or 'none'
local stored_seq = state[2] or '0'
if stored_epoch ~= epoch then
    return redis.error_reply('FENCED epoch ' .. stored_epoch .. ' is not ours (' .. epoch .. ')')
end
local next_seq = string.format('%d', tonumber(seq) + 1)
if stored_seq == next_seq then
    return 0
end
if stored_seq ~= seq then
    return redis.error_reply('FENCED seq ' .. stored_seq .. ' expected ' .. seq)
end
if #KEYS ~= 2 + nc + na then
    return redis.error_reply('PQLBATCH malformed: ' .. #KEYS .. ' keys')
end

-- unpack() in Redis's Lua 5.1 is limited to ~8000 values: chunk long lists.
local CHUNK = 4000

-- cmd key ARGV[first .. first+count-1] in chunks of `per` arguments per item
local function chunked(cmd, key, first, count, per)
    local i, last = first, first + count * per - 1
    while i <= last do
        local j = math.min(i + CHUNK - 1, last)
        redis.call(cmd, key, unpack(ARGV, i, j))
        i = j + 1
    end
end

local i = 8
if noff > 0 then
    chunked('HSET', meta, i, noff, 2)
    i = i + 2 * noff
end
if nput > 0 then
    chunked('HSET', KEYS[2], i, nput, 2)
    i = i + 2 * nput
end
if ndel > 0 then
    chunked('HDEL', KEYS[2], i, ndel, 1)
    i = i + ndel
end

for k = 1, nc do
    local key = KEYS[2 + k]
    local n = tonumber(ARGV[i])
    i = i + 1
    for _ = 1, n do
        redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
        i = i + 2
    end
end

for a = 1, na do
    local key = KEYS[2 + nc + a]
    local ttl = tonumber(ARGV[i])
    local nruns = tonumber(ARGV[i + 1])
    local did_set = false
    i = i + 2
    for _ = 1, nruns do
        local r = tonumber(ARGV[i])
        i = i + 1
        if r > 0 then
            chunked('HSET', key, i, r, 2)
            i = i + 2 * r
            did_set = true
        elseif r < 0 then
            chunked('HDEL', key, i, -r, 1)
            i = i - r
        end
    end
    if did_set and ttl > 0 then
        redis.call('PEXPIRE', key, ttl)
    end
end

redis.call('HSET', meta, 'seq', next_seq)
return 1
