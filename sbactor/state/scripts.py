"""Lua scripts run atomically inside Redis (pure text; the client registers them by SHA).

Numbers go in as strings and come back as strings: Redis truncates Lua numbers to integers in
replies, and spend is fractional USD.

Key layout (``P`` is ``state.key_prefix``):

- ``P b:<budget label>:<value>:<window start>`` — hash ``spent_cost spent_tokens reserved_cost
  reserved_tokens`` of one budget counter in one calendar window; expires after the window ends.
- ``P b:…:h`` — sorted set of the counter's in-flight reservations, member ``rid|cost|tokens``,
  score = when the reservation lapses; lapsed ones are released by the next script touching it.
- ``P r:<limit label>#<index>:<value>`` — hash of 1 s buckets ``r<second>`` / ``t<second>`` for
  rpm/tpm over a sliding 60 s window; expires after the window.
- ``P fb:<deployment id>`` — hash of one deployment's outcome EWMAs; ``P fb:index`` lists them.
- ``P req:<request id>`` — hash ``d`` (deployment) ``m`` (model) ``f`` (feedback claimed) of a
  served request, for ``POST /v1/feedback`` on any instance; expires after
  ``state.feedback_ttl_s``.
- ``P vc:<verdict cache key>`` — a guardrail result (JSON), with ``state.shared_verdict_cache``.
"""

from __future__ import annotations

# Release lapsed reservations of one counter (shared by reserve and reconcile).
_PURGE = """
local function purge(ckey, hkey, now)
  local lapsed = redis.call('ZRANGEBYSCORE', hkey, '-inf', now)
  if #lapsed > 0 then
    for _, m in ipairs(lapsed) do
      local _, c, t = string.match(m, '^(.*)|([^|]*)|([^|]*)$')
      redis.call('HINCRBYFLOAT', ckey, 'reserved_cost', -tonumber(c))
      redis.call('HINCRBYFLOAT', ckey, 'reserved_tokens', -tonumber(t))
    end
    redis.call('ZREMRANGEBYSCORE', hkey, '-inf', now)
  end
  if redis.call('ZCARD', hkey) == 0 then
    redis.call('HSET', ckey, 'reserved_cost', '0', 'reserved_tokens', '0')
  end
end
local function num(ckey, field)
  return tonumber(redis.call('HGET', ckey, field) or '0') or 0
end
"""

# KEYS: nr rate keys, then nb pairs (counter, holds).
# ARGV: now, member, cost, tokens, nr, reservation ttl, then per rate key (rpm, tpm; -1 = none),
#       then per budget pair (max_cost, max_tokens; -1 = none, key ttl; -1 = never expires).
# Returns {"ok", used_cost_1, used_tokens_1, spent_cost_1, spent_tokens_1, ...} (used = spent +
# reserved, before this request; spent alone feeds the burn rate), or
# {"rate", index, "rpm"|"tpm", used, retry_after} or {"budget", index, "cost"|"tokens", spent,
# reserved}. Nothing is recorded unless every limit and every budget admits the request.
RESERVE = _PURGE + """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local cost = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local nr = tonumber(ARGV[5])
local res_ttl = tonumber(ARGV[6])
local second = math.floor(now)
local horizon = second - 60
local eps = 1e-9
local a = 7
for i = 1, nr do
  local key = KEYS[i]
  local rpm = tonumber(ARGV[a]); local tpm = tonumber(ARGV[a + 1]); a = a + 2
  local flat = redis.call('HGETALL', key)
  local reqs, toks, secs, per = 0, 0, {}, {}
  for j = 1, #flat, 2 do
    local f = flat[j]
    local s = tonumber(string.sub(f, 2))
    if s <= horizon then
      redis.call('HDEL', key, f)
    else
      local v = tonumber(flat[j + 1])
      if per[s] == nil then per[s] = {0, 0}; table.insert(secs, s) end
      if string.sub(f, 1, 1) == 'r' then reqs = reqs + v; per[s][1] = per[s][1] + v
      else toks = toks + v; per[s][2] = per[s][2] + v end
    end
  end
  table.sort(secs)
  local function retry(idx, need)
    local dropped = 0
    for _, s in ipairs(secs) do
      dropped = dropped + per[s][idx]
      if dropped >= need then return math.max(s + 60 - now, 0.001) end
    end
    return 60
  end
  if rpm >= 0 and reqs + 1 > rpm then
    return {'rate', tostring(i), 'rpm', tostring(reqs), tostring(retry(1, reqs + 1 - rpm))}
  end
  if tpm >= 0 and toks + tokens > tpm then
    local wait = 60
    if tokens <= tpm then wait = retry(2, toks + tokens - tpm) end
    return {'rate', tostring(i), 'tpm', tostring(toks), tostring(wait)}
  end
end
local nb = (#KEYS - nr) / 2
local used = {}
for i = 1, nb do
  local ckey = KEYS[nr + 2 * i - 1]; local hkey = KEYS[nr + 2 * i]
  local max_cost = tonumber(ARGV[a]); local max_tokens = tonumber(ARGV[a + 1]); a = a + 3
  purge(ckey, hkey, now)
  local sc, st = num(ckey, 'spent_cost'), num(ckey, 'spent_tokens')
  local rc, rt = num(ckey, 'reserved_cost'), num(ckey, 'reserved_tokens')
  if max_cost >= 0 and sc + rc + cost > max_cost + eps then
    return {'budget', tostring(i), 'cost', tostring(sc), tostring(rc)}
  end
  if max_tokens >= 0 and st + rt + tokens > max_tokens + eps then
    return {'budget', tostring(i), 'tokens', tostring(st), tostring(rt)}
  end
  table.insert(used, tostring(sc + rc)); table.insert(used, tostring(st + rt))
  table.insert(used, tostring(sc)); table.insert(used, tostring(st))
end
for i = 1, nr do
  local key = KEYS[i]
  redis.call('HINCRBY', key, 'r' .. second, 1)
  redis.call('HINCRBYFLOAT', key, 't' .. second, tokens)
  redis.call('EXPIRE', key, 61)
end
a = 7 + 2 * nr
for i = 1, nb do
  local ckey = KEYS[nr + 2 * i - 1]; local hkey = KEYS[nr + 2 * i]
  local ttl = tonumber(ARGV[a + 2]); a = a + 3
  redis.call('HINCRBYFLOAT', ckey, 'reserved_cost', cost)
  redis.call('HINCRBYFLOAT', ckey, 'reserved_tokens', tokens)
  redis.call('ZADD', hkey, now + res_ttl, member)
  if ttl > 0 then
    redis.call('EXPIRE', ckey, ttl); redis.call('EXPIRE', hkey, ttl)
  end
end
local out = {'ok'}
for _, v in ipairs(used) do table.insert(out, v) end
return out
"""

# Swap a reservation for the actual spend (or, with an empty member, just add spend: the
# catch-up of requests served while Redis was unreachable).
# KEYS: nr rate keys, then pairs (counter, holds).
# ARGV: now, member ('' = none), actual cost, actual tokens, reserved tokens, admission second,
#       nr, then per budget pair the key ttl (-1 = never expires).
RECONCILE = _PURGE + """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local cost = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local held_tokens = tonumber(ARGV[5])
local second = ARGV[6]
local nr = tonumber(ARGV[7])
for i = 1, nr do
  local f = 't' .. second
  if redis.call('HEXISTS', KEYS[i], f) == 1 then
    local left = redis.call('HINCRBYFLOAT', KEYS[i], f, tokens - held_tokens)
    if tonumber(left) < 0 then redis.call('HSET', KEYS[i], f, '0') end
  end
end
local nb = (#KEYS - nr) / 2
for i = 1, nb do
  local ckey = KEYS[nr + 2 * i - 1]; local hkey = KEYS[nr + 2 * i]
  local ttl = tonumber(ARGV[7 + i])
  if member ~= '' and redis.call('ZREM', hkey, member) == 1 then
    local _, c, t = string.match(member, '^(.*)|([^|]*)|([^|]*)$')
    redis.call('HINCRBYFLOAT', ckey, 'reserved_cost', -tonumber(c))
    redis.call('HINCRBYFLOAT', ckey, 'reserved_tokens', -tonumber(t))
  end
  purge(ckey, hkey, now)
  redis.call('HINCRBYFLOAT', ckey, 'spent_cost', cost)
  redis.call('HINCRBYFLOAT', ckey, 'spent_tokens', tokens)
  if ttl > 0 then redis.call('EXPIRE', ckey, ttl) end
end
return 'ok'
"""

# Fold one outcome (or one client feedback) into a deployment's shared EWMAs, decaying the
# success/refusal rates toward the prior (1, 0) first — sbactor.routing.stats in Lua.
_FOLD = """
local function fold(key, index, id, now, alpha, decay_s, kind, ok, refused, cost, lat, value)
  local h = {}
  local flat = redis.call('HGETALL', key)
  for j = 1, #flat, 2 do h[flat[j]] = flat[j + 1] end
  local succ = tonumber(h.ewma_success or '1'); local refu = tonumber(h.ewma_refusal or '0')
  local last = tonumber(h.last_update or '')
  if last ~= nil and now > last then
    local keep = math.exp(-(now - last) / decay_s)
    succ = 1 + (succ - 1) * keep
    refu = refu * keep
  end
  local keep = 1 - alpha
  if kind == 'outcome' then
    cost = math.max(0, cost); lat = math.max(0, lat)
    redis.call('HINCRBY', key, 'samples', 1)
    redis.call('HINCRBY', key, 'successes', ok)
    redis.call('HINCRBY', key, 'refusals', refused)
    local c = tonumber(h.ewma_cost or '')
    if c == nil then c = cost else c = keep * c + alpha * cost end
    local l = tonumber(h.ewma_latency or '')
    if l == nil then l = lat else l = keep * l + alpha * lat end
    succ = keep * succ + alpha * ok
    refu = keep * refu + alpha * refused
    redis.call('HSET', key, 'ewma_cost', tostring(c), 'ewma_latency', tostring(l))
  else
    local v = math.min(1, math.max(0, value))
    redis.call('HINCRBY', key, 'feedback', 1)
    succ = keep * succ + alpha * v
  end
  redis.call('HSET', key, 'ewma_success', tostring(succ), 'ewma_refusal', tostring(refu),
             'last_update', tostring(now))
  redis.call('SADD', index, id)
end
"""

# KEYS: stats hash, index set[, request key]. ARGV: deployment id, now (wall s), alpha, decay_s,
# kind ('outcome' | 'feedback'), success, refused, cost, latency, feedback value[, model,
# request key ttl]. With a request key, the request → deployment mapping is recorded too, so
# POST /v1/feedback works on any instance.
FEEDBACK_UPDATE = _FOLD + """
fold(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
     ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]),
     tonumber(ARGV[10]))
if #KEYS >= 3 then
  redis.call('HSET', KEYS[3], 'd', ARGV[1], 'm', ARGV[11], 'o', ARGV[13] or '')
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[12]))
end
return 'ok'
"""

# Client feedback for a request any instance served: claim it once (first claim wins, on every
# instance) and fold it into the serving deployment's shared EWMAs.
# KEYS: request key, index set. ARGV: stats key prefix, now (wall s), alpha, decay_s, value,
# owner (the virtual key id; another key's request answers as unknown).
# Returns {'unknown'} | {'duplicate', deployment, model} | {'applied', deployment, model}.
FEEDBACK_CLAIM = _FOLD + """
local d = redis.call('HGET', KEYS[1], 'd')
if not d then return {'unknown'} end
if (redis.call('HGET', KEYS[1], 'o') or '') ~= (ARGV[6] or '') then return {'unknown'} end
local m = redis.call('HGET', KEYS[1], 'm') or ''
if redis.call('HSETNX', KEYS[1], 'f', '1') == 0 then return {'duplicate', d, m} end
fold(ARGV[1] .. d, KEYS[2], d, tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
     'feedback', 0, 0, 0, 0, tonumber(ARGV[5]))
return {'applied', d, m}
"""

# Every deployment's shared stats in one round trip: {id, {field, value, ...}, ...}.
# KEYS: index set. ARGV: the stats key prefix.
FEEDBACK_READ = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  table.insert(out, id)
  table.insert(out, redis.call('HGETALL', ARGV[1] .. id))
end
return out
"""

SCRIPTS: dict[str, str] = {
    "reserve": RESERVE,
    "reconcile": RECONCILE,
    "feedback_update": FEEDBACK_UPDATE,
    "feedback_claim": FEEDBACK_CLAIM,
    "feedback_read": FEEDBACK_READ,
}
