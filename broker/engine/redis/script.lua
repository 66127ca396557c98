-- trio-broker's Redis engine: every step that must be atomic, as one Redis
-- function library (FUNCTION LOAD: loaded once per primary, the helpers
-- below are made once, not at every call). The loader prepends the
-- "#!lua name=..." line and names the library and its one function after
-- this file's hash (@NAME@), so brokers of two versions can share a Redis.
--
-- FCALL @NAME@ numkeys KEYS... op run ARGS...: ARGV[1] names the operation;
-- ARGV[2] is the run_id of the Redis server as the calling node knows it.
-- Each operation touches the keys of one topic, or of one history rule
-- (whose topics share a hash slot), so it runs on Redis Cluster too. See
-- broker/engine/redis/layout.py for the names and docs/cluster.md for the
-- design.
--
-- Keys of a topic of a history rule (B = prefix .. "h:{" .. rule id .. "}:"):
--   B.."rule"     hash  (no expiry: three fields per rule)
--                       g: generation (new when the rule's state was lost)
--                       o: offset counter (one per stored publish of the rule)
--                       f: newest offset of a topic forgotten by the index
--   B.."topics"   zset  topic -> offset of its newest message (the census op
--                       drops the topics whose state expired), and WHOLE
--                       (see rule_state) at -1
--   B.."m:"..T    hash  e: epoch, s: seq, r: run_id, g: rule generation,
--                       b: offset when the epoch began, lo: newest offset,
--                       tr: newest offset no longer stored, k: "1" when the
--                       topic has a snapshot
--   B.."s:"..T    stream, ids "<seq>-0", fields o (offset), t (ms), [k], d
--   B.."k:"..T    hash  snapshot: "l" the latest unkeyed message, "k"..key
--                       the latest per key, "!" always (so it never vanishes)
--   B.."z:"..T    zset  snapshot keys by seq (least recently updated first)
-- Keys of a topic without history: prefix.."t:{"..T.."}" hash e, s, r.
-- prefix.."census" and prefix.."census:lease" (plain strings, not used by
-- this script): the last census of what the deployment keeps, and which
-- node takes the next (broker/engine/redis/engine.py).
-- Presence keys of a topic (P: the topic's keys' prefix .. "p:" .. T .. ":",
-- in the same slot as the topic's keys and channel):
--   P.."n"        zset  node -> expiry (ms)
--   P.."c:"..N    hash  connection -> subject (the connections of node N)
--   P.."m"        hash  subject -> connections (over every node)
--   P.."f"        hash  subject -> the member's fields (msgpack)
--
-- A publication goes out as one message on the topic's channel (PUBLISH; on
-- Redis Cluster, for a topic of a history rule, SPUBLISH on the topic's
-- shard channel and on the rule's):
--   "m" .. >I8 seq .. >I2 #epoch .. >I2 #key .. >I2 #topic .. epoch .. key
--       .. topic .. data
-- and a presence event as "j" or "l" .. >I2 #topic .. topic .. the member's
-- fields (msgpack).

-- Set by each call (see main at the end).
local KEYS, ARGV, run = {}, {}, ''

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The topic's state was written by another Redis process (this one restarted
-- from a persisted file, or a replica took over): writes acknowledged before
-- may be lost, so a new epoch begins. Unless the caller's idea of the run_id
-- is the stale one: then it must ask again.
local function new_owner()
  local info = redis.call('INFO', 'server')
  local actual = string.match(info, 'run_id:(%x+)')
  if actual ~= run then
    return error({err = 'STALE ' .. tostring(actual)})
  end
  return true
end

local function seq_of(id)
  return tonumber(string.match(id, '^(%d+)'))
end

local function split(text)
  local out = {}
  for token in string.gmatch(text, '[^.]+') do
    out[#out + 1] = token
  end
  return out
end

-- Whether the topic matches the (split) pattern: broker.core.topics.pattern_matches.
local function matches(ptoks, topic)
  local ttoks = split(topic)
  for i = 1, #ptoks do
    local p = ptoks[i]
    if p == '>' then
      return #ttoks >= i
    end
    if i > #ttoks then
      return false
    end
    if p ~= '*' and p ~= ttoks[i] then
      return false
    end
  end
  return #ptoks == #ttoks
end

-- Send *payload* on the channel(s) of ARGV: ev.channel, ev.rule_channel
-- (sharded only; "" for none) and ev.sharded.
local function fan_out(ev, payload)
  if ev.sharded then
    redis.call('SPUBLISH', ev.channel, payload)
    if ev.rule_channel ~= '' then
      redis.call('SPUBLISH', ev.rule_channel, payload)
    end
  else
    redis.call('PUBLISH', ev.channel, payload)
  end
end

local function publish(ev, topic, seq, epoch, key, data)
  fan_out(ev, 'm' .. struct.pack('>I8I2I2I2', seq, #epoch, #key, #topic) .. epoch .. key
    .. topic .. data)
end

-- == history rules =========================================================

-- The member of a rule's index of topics that says the index is whole: an
-- empty name (no topic has one) at score -1 (below every offset, so no walk
-- of the index meets it). An index without it was lost (evicted) since the
-- rule's state was made: a pattern resume cannot tell which topics it knew.
local WHOLE = ''

-- The rule's state (generation and offset counter), made if missing.
local function rule_state(base, candidate)
  local rule_key = base .. 'rule'
  local r = redis.call('HMGET', rule_key, 'g', 'o', 'f')
  if not r[1] then
    redis.call('HSET', rule_key, 'g', candidate, 'o', 0, 'f', 0)
    redis.call('ZADD', base .. 'topics', -1, WHOLE)
    return candidate, 0, 0
  end
  return r[1], tonumber(r[2]), tonumber(r[3])
end

-- A topic's state lives *keep_ms* after its last publish (for ever: 0).
local function keep(key, keep_ms)
  if keep_ms > 0 then
    redis.call('PEXPIRE', key, keep_ms)
  end
end

-- The topic's state, begun anew (new epoch, seq 0) when missing or no longer
-- trustworthy. Returns the fields as a table.
local function open_topic(base, topic, candidate, gen, offset, keep_ms, may_write)
  local mkey = base .. 'm:' .. topic
  local m = redis.call('HMGET', mkey, 'e', 's', 'r', 'g', 'b', 'lo', 'tr', 'k')
  local fresh = (not m[1]) or m[4] ~= gen
  if not fresh and m[8] == '1' and redis.call('EXISTS', base .. 'k:' .. topic) == 0 then
    fresh = true -- the snapshot was evicted: it cannot be vouched for
  end
  if not fresh and m[3] ~= run then
    fresh = new_owner()
  end
  if not fresh then
    return {e = m[1], s = tonumber(m[2]), b = tonumber(m[5]), lo = tonumber(m[6]),
            tr = tonumber(m[7]), mkey = mkey, opened = false}
  end
  if not may_write then
    return nil
  end
  -- Messages of an earlier epoch newer than a cursor are gone: "tr" says so.
  local old = tonumber(redis.call('ZSCORE', base .. 'topics', topic)) or 0
  redis.call('DEL', mkey, base .. 's:' .. topic, base .. 'k:' .. topic, base .. 'z:' .. topic)
  redis.call('HSET', mkey, 'e', candidate, 's', 0, 'r', run, 'g', gen, 'b', offset,
    'lo', offset, 'tr', old)
  keep(mkey, keep_ms)
  return {e = candidate, s = 0, b = offset, lo = offset, tr = old, mkey = mkey, opened = true}
end

-- ARGV: op, run, candidate, base, topic, data, key, null, size, ttl_ms,
--       keep_ms, snapshot, snapshot_keys, channel, rule_channel, sharded
local function pub_history()
  local candidate, base, topic = ARGV[3], ARGV[4], ARGV[5]
  local data, key, null = ARGV[6], ARGV[7], ARGV[8]
  local size, ttl, keep_ms = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
  local snapshot, snapshot_keys = ARGV[12] == '1', tonumber(ARGV[13])
  local ev = {channel = ARGV[14], rule_channel = ARGV[15], sharded = ARGV[16] == '1'}
  local rule_key = base .. 'rule'
  local gen, offset = rule_state(base, candidate)
  local t = open_topic(base, topic, candidate, gen, offset, keep_ms, true)
  local now = now_ms()
  local seq = t.s + 1
  offset = redis.call('HINCRBY', rule_key, 'o', 1)
  -- The meta's new fields, written at once below.
  local fields = {'HSET', t.mkey, 's', seq, 'lo', offset}
  if size > 0 then
    local stream = base .. 's:' .. topic
    if key == '' then
      redis.call('XADD', stream, seq .. '-0', 'o', offset, 't', now, 'd', data)
    else
      redis.call('XADD', stream, seq .. '-0', 'o', offset, 't', now, 'k', key, 'd', data)
    end
    -- Trim what is past the rule's size or ttl, oldest first: usually the
    -- one entry the new one pushed out (a bounded amount per publish;
    -- reads skip the rest).
    local cut, limit, last = seq - size, now - ttl, nil
    for _ = 1, 32 do
      local heads = redis.call('XRANGE', stream, '-', '+', 'COUNT', 2)
      local stop = false
      for _, head in ipairs(heads) do
        if seq_of(head[1]) > cut and tonumber(head[2][4]) > limit then
          stop = true
          break
        end
        last = head
      end
      if stop or #heads < 2 then
        break
      end
      redis.call('XTRIM', stream, 'MINID', (seq_of(last[1]) + 1) .. '-0')
    end
    if last then
      redis.call('XTRIM', stream, 'MINID', (seq_of(last[1]) + 1) .. '-0')
      fields[#fields + 1] = 'tr'
      fields[#fields + 1] = last[2][2]
    end
    redis.call('PEXPIRE', stream, ttl)
  else
    fields[#fields + 1] = 'tr' -- nothing is stored
    fields[#fields + 1] = offset
  end
  if snapshot then
    local snap, order = base .. 'k:' .. topic, base .. 'z:' .. topic
    local entry = struct.pack('>I8I8I8', seq, offset, now) .. data
    if key == '' then
      redis.call('HSET', snap, '!', '', 'l', entry)
    elseif null == '1' then
      redis.call('HDEL', snap, 'k' .. key)
      redis.call('ZREM', order, key)
    else
      redis.call('HSET', snap, '!', '', 'k' .. key, entry)
      redis.call('ZADD', order, seq, key)
      if redis.call('ZCARD', order) > snapshot_keys then
        local gone = redis.call('ZPOPMIN', order)
        redis.call('HDEL', snap, 'k' .. gone[1])
      end
    end
    fields[#fields + 1] = 'k'
    fields[#fields + 1] = '1'
  end
  redis.call(unpack(fields))
  -- The rule's index of topics (no expiry: the census op drops the topics
  -- whose state expired; the WHOLE member stays).
  redis.call('ZADD', base .. 'topics', offset, topic)
  if keep_ms > 0 and not t.opened then
    redis.call('PEXPIRE', t.mkey, keep_ms)
  end
  publish(ev, topic, seq, t.e, key, data)
  return seq
end

-- ARGV: op, run, candidate, data, key, keep_ms, channel, sharded, topic;
-- KEYS[1]: the state
local function pub_plain()
  local mkey = KEYS[1]
  local m = redis.call('HMGET', mkey, 'e', 's', 'r')
  local epoch, seq = m[1], tonumber(m[2])
  if (not epoch) or (m[3] ~= run and new_owner()) then
    epoch, seq = ARGV[3], 0
    redis.call('HSET', mkey, 'e', epoch, 'r', run)
  end
  seq = seq + 1
  redis.call('HSET', mkey, 's', seq)
  redis.call('PEXPIRE', mkey, tonumber(ARGV[6]))
  local ev = {channel = ARGV[7], rule_channel = '', sharded = ARGV[8] == '1'}
  publish(ev, ARGV[9], seq, epoch, ARGV[5], ARGV[4])
  return seq
end

-- -- reads ---------------------------------------------------------------------

-- Entries flattened: seq, offset, time, key (or false), data.
local function add_entry(out, e)
  local f = e[2]
  local key = false
  local data = f[6]
  if f[5] == 'k' then
    key, data = f[6], f[8]
  end
  out[#out + 1] = seq_of(e[1])
  out[#out + 1] = tonumber(f[2])
  out[#out + 1] = tonumber(f[4])
  out[#out + 1] = key
  out[#out + 1] = data
end

-- The stored entries after *since* (a seq of the current epoch) that the rule
-- still keeps, in order; nil when some message after it is no longer kept.
-- At most *limit* entries (0: no limit); the second value: whether more follow.
local function after(base, topic, t, since, size, limit_time, limit)
  if since > t.s then
    return nil
  end
  if since == t.s then
    return {}, false
  end
  if size == 0 or since < t.s - size then
    return nil
  end
  local args = {'XRANGE', base .. 's:' .. topic, '(' .. since .. '-0', '+'}
  if limit > 0 then
    args[#args + 1] = 'COUNT'
    args[#args + 1] = limit + 1
  end
  local entries = redis.call(unpack(args))
  local first = entries[1]
  if not first or seq_of(first[1]) ~= since + 1 or tonumber(first[2][4]) <= limit_time then
    return nil
  end
  local out = {}
  local more = false
  for i, e in ipairs(entries) do
    if limit > 0 and i > limit then
      more = true
      break
    end
    add_entry(out, e)
  end
  return out, more
end

-- The latest *count* unexpired entries, oldest first.
local function latest(base, topic, t, count, size, limit_time)
  if size == 0 or count <= 0 then
    return {}
  end
  local low = math.max(1, t.s - size + 1)
  local entries = redis.call('XREVRANGE', base .. 's:' .. topic, '+', low .. '-0', 'COUNT', count)
  local out = {}
  for i = #entries, 1, -1 do
    local e = entries[i]
    if tonumber(e[2][4]) > limit_time then
      add_entry(out, e)
    end
  end
  return out
end

-- The snapshot: seq, offset, time, key (or false), data for each entry.
local function snapshot_of(base, topic)
  local raw = redis.call('HGETALL', base .. 'k:' .. topic)
  local out = {}
  for i = 1, #raw, 2 do
    local field, value = raw[i], raw[i + 1]
    if field ~= '!' then
      local seq, offset, time = struct.unpack('>I8I8I8', value)
      out[#out + 1] = seq
      out[#out + 1] = offset
      out[#out + 1] = time
      if field == 'l' then
        out[#out + 1] = false
      else
        out[#out + 1] = string.sub(field, 2)
      end
      out[#out + 1] = string.sub(value, 25)
    end
  end
  return out
end

-- One topic of a rule, for a subscriber: its position, and what it asked for.
-- ARGV: op, run, candidate, base, topic, size, ttl_ms, keep_ms,
--       since_epoch, since_seq (-1: none), latest (0: none), snapshot (0/1),
--       limit (0: none)
-- Returns {epoch, seq, status, entries, snapshot, more}; status 1: served,
-- 0: since cannot be served, -1: no since.
local function read_topic()
  local candidate, base, topic = ARGV[3], ARGV[4], ARGV[5]
  local size, ttl, keep_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  local since_epoch, since_seq = ARGV[9], tonumber(ARGV[10])
  local count, want_snapshot, limit = tonumber(ARGV[11]), ARGV[12] == '1', tonumber(ARGV[13])
  local gen, offset = rule_state(base, candidate)
  local t = open_topic(base, topic, candidate, gen, offset, keep_ms, true)
  local limit_time = now_ms() - ttl
  local status, entries, snap, more = -1, {}, {}, false
  if since_seq >= 0 then
    local found, rest = nil, false
    if since_epoch == t.e then
      found, rest = after(base, topic, t, since_seq, size, limit_time, limit)
    end
    if found then
      status, entries, more = 1, found, rest
    else
      status = 0
    end
  elseif count > 0 then
    entries = latest(base, topic, t, count, size, limit_time)
  end
  if want_snapshot and status ~= 1 then
    snap = snapshot_of(base, topic)
  end
  return {t.e, t.s, status, entries, snap, more and 1 or 0}
end

-- The topics of the rule that match the pattern, newest first:
-- {topic, last offset, ...}; only those whose last offset is above *above*.
local function matching(base, ptoks, above)
  local raw = redis.call('ZRANGEBYSCORE', base .. 'topics', '(' .. above, '+inf', 'WITHSCORES')
  local out = {}
  for i = #raw - 1, 1, -2 do
    if matches(ptoks, raw[i]) then
      out[#out + 1] = raw[i]
      out[#out + 1] = tonumber(raw[i + 1])
    end
  end
  return out
end

-- A pattern subscriber, on one rule: the cursor now, and on request the
-- latest N or the snapshot of the matching topics.
-- ARGV: op, run, candidate, base, pattern, size, ttl_ms, count, snapshot (0/1)
-- Returns {gen, offset, topics} where topics is a list of
-- {topic, epoch, seq, entries, snapshot}.
local function read_pattern()
  local candidate, base, pattern = ARGV[3], ARGV[4], ARGV[5]
  local size, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
  local count, want_snapshot = tonumber(ARGV[8]), ARGV[9] == '1'
  local gen, offset = rule_state(base, candidate)
  local out = {}
  if count <= 0 and not want_snapshot then
    return {gen, offset, out}
  end
  local limit_time = now_ms() - ttl
  local found = matching(base, split(pattern), -1)
  local newest = {} -- offsets of the entries taken, for the latest N
  for i = 1, #found, 2 do
    local topic, last = found[i], found[i + 1]
    if count > 0 and #newest >= count and last < newest[count] then
      break -- no entry of this topic (or an older one) can be among the N latest
    end
    local t = open_topic(base, topic, candidate, gen, offset, 0, false)
    if t then
      local entries, snap = {}, {}
      if want_snapshot then
        snap = snapshot_of(base, topic)
      else
        entries = latest(base, topic, t, count, size, limit_time)
        for j = 2, #entries, 5 do
          newest[#newest + 1] = entries[j]
        end
        table.sort(newest, function(a, b) return a > b end)
      end
      if #entries > 0 or #snap > 0 then
        out[#out + 1] = {topic, t.e, t.s, entries, snap}
      end
    end
  end
  return {gen, offset, out}
end

-- A pattern subscriber back after an absence, on one rule (see
-- docs/history.md, "Patterns"). ARGV: op, run, candidate, base, pattern,
-- size, ttl_ms, cursor_gen, cursor_offset, then (topic, epoch or "", seq)
-- for each position the client gave.
-- Returns {gen, offset, unknown, results} where results is a list of
-- {topic, epoch, seq, status, entries}; status 1: replayed (entries may be
-- empty), 0: lost.
local function resume()
  local candidate, base, pattern = ARGV[3], ARGV[4], ARGV[5]
  local size, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
  local cursor_gen, cursor = ARGV[8], tonumber(ARGV[9])
  local gen, offset, forgotten = rule_state(base, candidate)
  if gen ~= cursor_gen or cursor > offset then
    return {gen, offset, 1, {}}
  end
  if not redis.call('ZSCORE', base .. 'topics', WHOLE) then
    forgotten = offset -- the index was lost: every topic it knew may be missed
  end
  local limit_time = now_ms() - ttl
  local positions = {}
  local order = {}
  for i = 10, #ARGV, 3 do
    positions[ARGV[i]] = {ARGV[i + 1], tonumber(ARGV[i + 2])}
    order[#order + 1] = ARGV[i]
  end
  local found = matching(base, split(pattern), cursor)
  for i = 1, #found, 2 do
    if not positions[found[i]] then
      order[#order + 1] = found[i]
    end
  end
  local results = {}
  for _, topic in ipairs(order) do
    local position = positions[topic]
    local t = open_topic(base, topic, candidate, gen, offset, 0, false)
    local entries = nil
    if not t then
      entries = nil -- forgotten (or written by another Redis): lost
      local last = tonumber(redis.call('ZSCORE', base .. 'topics', topic)) or 0
      if not position and last <= cursor then
        entries = {}
      end
    elseif position and (position[1] ~= '' or t.b <= cursor) then
      if position[1] == '' or position[1] == t.e then
        entries = after(base, topic, t, position[2], size, limit_time, 0)
      end
    elseif t.lo <= cursor then
      entries = {}
    elseif t.tr > cursor or position then
      entries = nil -- messages after the cursor are gone, or of an ended epoch
    else
      -- Every kept message after the cursor; those expired are gone.
      local all = redis.call('XRANGE', base .. 's:' .. topic, '-', '+')
      entries = {}
      for _, e in ipairs(all) do
        if tonumber(e[2][2]) > cursor then
          if tonumber(e[2][4]) <= limit_time then
            entries = nil
            break
          end
          add_entry(entries, e)
        end
      end
    end
    if entries == nil then
      results[#results + 1] = {topic, t and t.e or '', t and t.s or 0, 0, {}}
    elseif #entries > 0 or position then
      results[#results + 1] = {topic, t and t.e or '', t and t.s or 0, 1, entries}
    end
  end
  return {gen, offset, forgotten > cursor and 1 or 0, results}
end

-- The census of a rule, 256 topics of its index per call (oldest first
-- from offset *start*): drop from the index the topics whose state expired,
-- and count what the others keep. ARGV: op, run, candidate, base, start.
-- Returns {next offset (0: done), topics, topics with something stored,
-- messages stored, bytes (MEMORY USAGE of their streams and snapshots)}.
local function census()
  local base, start = ARGV[4], tonumber(ARGV[5])
  local index = base .. 'topics'
  local raw = redis.call('ZRANGEBYSCORE', index, start, '+inf', 'WITHSCORES', 'LIMIT', 0, 256)
  local state = redis.call('HMGET', base .. 'rule', 'o', 'f')
  local forgotten = tonumber(state[2] or '0')
  if start == 0 and state[1] and not redis.call('ZSCORE', index, WHOLE) then
    -- The index was lost: what it knew of, up to now, is forgotten.
    forgotten = math.max(forgotten, tonumber(state[1]))
    redis.call('ZADD', index, -1, WHOLE)
  end
  local topics, stored, messages, bytes = 0, 0, 0, 0
  for i = 1, #raw, 2 do
    local topic = raw[i]
    if redis.call('EXISTS', base .. 'm:' .. topic) == 0 then
      redis.call('ZREM', index, topic)
      forgotten = math.max(forgotten, tonumber(raw[i + 1]))
    else
      topics = topics + 1
      local n = redis.call('XLEN', base .. 's:' .. topic)
      local kept = n
      for _, suffix in ipairs({'s:', 'k:', 'z:'}) do
        local size = redis.call('MEMORY', 'USAGE', base .. suffix .. topic)
        if size then
          bytes = bytes + size
          if suffix == 'k:' then
            kept = kept + 1
          end
        end
      end
      messages = messages + n
      if kept > 0 then
        stored = stored + 1
      end
    end
  end
  if redis.call('EXISTS', base .. 'rule') == 1 then
    redis.call('HSET', base .. 'rule', 'f', forgotten)
  end
  local next = 0
  if #raw >= 512 then
    next = tonumber(raw[#raw]) + 1
  end
  return {next, topics, stored, messages, bytes}
end

-- == presence ==============================================================

-- The topic's channel, for presence events. ARGV: ..., base, channel,
-- sharded, topic (from ARGV[3]).
local function presence_context()
  return ARGV[3], {channel = ARGV[4], rule_channel = '', sharded = ARGV[5] == '1',
    topic = ARGV[6]}
end

local function presence_event(ev, kind, fields)
  fan_out(ev, kind .. struct.pack('>I2', #ev.topic) .. ev.topic .. fields)
end

local function presence_keep(base, node, ttl)
  for _, suffix in ipairs({'n', 'm', 'f', 'c:' .. node}) do
    redis.call('PEXPIRE', base .. suffix, ttl * 2)
  end
end

local function join(base, ev, node, conn, subject, fields)
  if redis.call('HSETNX', base .. 'c:' .. node, conn, subject) == 0 then
    return 0
  end
  if redis.call('HINCRBY', base .. 'm', subject, 1) == 1 then
    redis.call('HSET', base .. 'f', subject, fields)
    presence_event(ev, 'j', fields)
    return 1
  end
  return 0
end

local function leave(base, ev, ckey, conn, subject)
  redis.call('HDEL', ckey, conn)
  if redis.call('HINCRBY', base .. 'm', subject, -1) <= 0 then
    redis.call('HDEL', base .. 'm', subject)
    local fields = redis.call('HGET', base .. 'f', subject) or ''
    redis.call('HDEL', base .. 'f', subject)
    presence_event(ev, 'l', fields)
    return 1
  end
  return 0
end

-- Count out the connections of nodes that stopped refreshing (each member
-- whose last connection goes gets a "leave").
local function sweep(base, ev, now)
  local dead = redis.call('ZRANGEBYSCORE', base .. 'n', '-inf', now)
  for _, node in ipairs(dead) do
    local ckey = base .. 'c:' .. node
    local conns = redis.call('HGETALL', ckey)
    for i = 1, #conns, 2 do
      leave(base, ev, ckey, conns[i], conns[i + 1])
    end
    redis.call('DEL', ckey)
    redis.call('ZREM', base .. 'n', node)
  end
end

-- ARGV: op, run, base, channel, sharded, topic, node, ttl_ms, sync (0/1),
-- then (conn, subject, fields) for each connection to join. With sync,
-- these are all the node's connections on the topic: others it had are
-- counted out (a leave that could not reach Redis), and those a sweep took
-- come back.
local function presence_join()
  local base, ev = presence_context()
  local node, ttl = ARGV[7], tonumber(ARGV[8])
  local now = now_ms()
  -- The caller is alive: its own entry is refreshed before the sweep, which
  -- counts out only the nodes that stopped refreshing.
  redis.call('ZADD', base .. 'n', now + ttl, node)
  sweep(base, ev, now)
  local changed = 0
  local wanted = {}
  for i = 10, #ARGV, 3 do
    wanted[ARGV[i]] = true
    changed = changed + join(base, ev, node, ARGV[i], ARGV[i + 1], ARGV[i + 2])
  end
  if ARGV[9] == '1' then
    local ckey = base .. 'c:' .. node
    local had = redis.call('HGETALL', ckey)
    for i = 1, #had, 2 do
      if not wanted[had[i]] then
        changed = changed + leave(base, ev, ckey, had[i], had[i + 1])
      end
    end
    if next(wanted) == nil then
      redis.call('ZREM', base .. 'n', node)
      return changed
    end
  end
  presence_keep(base, node, ttl)
  return changed
end

-- ARGV: op, run, base, channel, sharded, topic, node, ttl_ms, conn
local function presence_leave()
  local base, ev = presence_context()
  local node, ttl, conn = ARGV[7], tonumber(ARGV[8]), ARGV[9]
  local now = now_ms()
  redis.call('ZADD', base .. 'n', 'XX', now + ttl, node) -- alive (see presence_join)
  sweep(base, ev, now)
  local ckey = base .. 'c:' .. node
  local subject = redis.call('HGET', ckey, conn)
  if not subject then
    return 0
  end
  return leave(base, ev, ckey, conn, subject)
end

-- ARGV: op, run, base, channel, sharded, topic, max_members
-- Returns {count, connections, members or false} with members a list of
-- {fields, connections} sorted by subject.
local function presence_query()
  local base, ev = presence_context()
  local most = tonumber(ARGV[7])
  sweep(base, ev, now_ms())
  local counts = redis.call('HGETALL', base .. 'm')
  local count, connections = #counts / 2, 0
  for i = 2, #counts, 2 do
    connections = connections + tonumber(counts[i])
  end
  if count > most then
    return {count, connections, false}
  end
  local subjects = {}
  for i = 1, #counts, 2 do
    subjects[#subjects + 1] = counts[i]
  end
  table.sort(subjects)
  local lookup = {}
  for i = 1, #counts, 2 do
    lookup[counts[i]] = tonumber(counts[i + 1])
  end
  local members = {}
  for _, subject in ipairs(subjects) do
    members[#members + 1] = {redis.call('HGET', base .. 'f', subject) or '', lookup[subject]}
  end
  return {count, connections, members}
end


local function main(keys, args)
  KEYS, ARGV, run = keys, args, args[2]
  local op = args[1]
  if op == 'pub' then
    return pub_history()
  elseif op == 'pub0' then
    return pub_plain()
  elseif op == 'read' then
    return read_topic()
  elseif op == 'pattern' then
    return read_pattern()
  elseif op == 'resume' then
    return resume()
  elseif op == 'census' then
    return census()
  elseif op == 'pjoin' then
    return presence_join()
  elseif op == 'pleave' then
    return presence_leave()
  elseif op == 'pquery' then
    return presence_query()
  end
  return error({err = 'ERR unknown operation ' .. tostring(op)})
end

redis.register_function('@NAME@', main)
