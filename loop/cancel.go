package loop

import (
	"encoding/binary"
	"net"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// Cancel requests.
//
// A client of pgmfa receives its database backend's own BackendKeyData,
// unchanged: the PID it knows is the one
// pg_backend_pid() returns, NotificationResponse carries, and
// pg_terminate_backend and pg_stat_activity use. A CancelRequest carrying
// that key is therefore valid at the database itself, and pgmfa forwards
// it there byte for byte, as PostgreSQL would have received it from the
// client; the database checks the key, exactly as it does for a client
// connected directly.
//
// Routing: keys of sessions this process carries are recognised (cancelMap)
// and forwarded at once to the database that session uses. A key pgmfa does
// not know is forwarded too, to the configured database, because it may be
// perfectly valid: a session opened through another pgmfa instance in front
// of the same database (a fleet behind a load balancer sends a client's
// cancel connection to any instance), or one opened directly. So cancels
// work across a fleet with no shared state. What pgmfa must not do is let
// an unauthenticated client guess keys faster through it than it could
// against the database directly (where every attempt costs a backend
// fork): unknown keys are rate limited per source address by a token
// bucket (cancelLimiter), and the table of buckets has a fixed size, so a
// flood of source addresses cannot grow pgmfa's memory.
//
// The secret is 32 random bits under protocol 3.0 (up to 256 bytes under
// 3.2; PostgreSQL 18 issues 32 bytes), so at the limit below a guess at one
// backend's key takes years; keys of known sessions are never limited.

// Limits for CancelRequests whose key belongs to no session of this process.
const (
	unknownCancelRate  = 10.0 // tokens per second per source
	unknownCancelBurst = 20.0 // bucket size
	// cancelSources bounds the table of per-source buckets. When it is full
	// and no bucket is idle (full again), new sources share one overflow
	// bucket, so a flood from many addresses is limited as a whole.
	cancelSources = 4096
)

// routeCancel decides a CancelRequest from the client at addr and logs the
// decision: true means forward it to the database.
func (s *Server) routeCancel(req *pgproto3.CancelRequest, addr string) bool {
	now := time.Now()
	v := s.cancels.route(req, addr, now)
	switch {
	case v.known:
		s.log.Debug("cancel request forwarded", "conn", v.conn, "client", addr)
	case v.forward:
		s.log.Debug("cancel request with a key of no session here forwarded to the database", "client", addr)
	case s.cancels.logDrop(now):
		s.log.Warn("cancel requests with unknown keys dropped: rate limit per source address reached",
			"client", addr, "limit_per_second", unknownCancelRate)
	}
	return v.forward
}

// cancelMap is the registry of the cancel keys of the sessions this process
// carries (the database's own keys, as the clients received them) and the
// limiter for every other key.
type cancelMap struct {
	mu      sync.Mutex
	m       map[string]*cancelOwner
	limiter cancelLimiter
	dropLog time.Time // last warning about dropped cancels
}

// logDrop rate-limits the warning about dropped cancels to one a minute.
func (cm *cancelMap) logDrop(now time.Time) bool {
	cm.mu.Lock()
	defer cm.mu.Unlock()
	if now.Sub(cm.dropLog) < time.Minute {
		return false
	}
	cm.dropLog = now
	return true
}

// cancelOwner is the session that owns a key; its pointer identity tells a
// session's entry from a later session's entry for a reused key.
type cancelOwner struct {
	conn uint64 // connection id, for the log
}

func keyString(pid uint32, secret []byte) string {
	b := make([]byte, 4, 4+len(secret))
	binary.BigEndian.PutUint32(b, pid)
	return string(append(b, secret...))
}

// add registers the key of a released session; the returned function
// removes it (and only it: if the database reused the PID and secret for a
// later session of this process meanwhile, that entry stays).
func (cm *cancelMap) add(key *pgproto3.BackendKeyData, conn uint64) (remove func()) {
	if key == nil {
		return func() {}
	}
	k := keyString(key.ProcessID, key.SecretKey)
	owner := &cancelOwner{conn: conn}
	cm.mu.Lock()
	if cm.m == nil {
		cm.m = make(map[string]*cancelOwner)
	}
	cm.m[k] = owner
	cm.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			cm.mu.Lock()
			if cm.m[k] == owner {
				delete(cm.m, k)
			}
			cm.mu.Unlock()
		})
	}
}

// cancelVerdict is what to do with one CancelRequest.
type cancelVerdict struct {
	forward bool
	known   bool   // the key belongs to a session of this process
	conn    uint64 // that session, when known
}

// route decides a CancelRequest from the client at addr: a known key is
// forwarded; an unknown one is forwarded while the source is within its
// rate limit, and dropped silently otherwise (PostgreSQL never answers a
// CancelRequest either).
func (cm *cancelMap) route(req *pgproto3.CancelRequest, addr string, now time.Time) cancelVerdict {
	k := keyString(req.ProcessID, req.SecretKey)
	cm.mu.Lock()
	defer cm.mu.Unlock()
	if o, ok := cm.m[k]; ok {
		return cancelVerdict{forward: true, known: true, conn: o.conn}
	}
	return cancelVerdict{forward: cm.limiter.allow(sourceKey(addr), now)}
}

// cancelLimiter is a token bucket per source, in a table of bounded size.
// Not safe for concurrent use; cancelMap's mutex guards it.
type cancelLimiter struct {
	rate, burst float64 // zero: the defaults above
	max         int     // table size; zero: cancelSources
	buckets     map[string]*bucket
	overflow    bucket
	lastSweep   time.Time
}

type bucket struct {
	tokens float64
	at     time.Time
}

// take refills b up to now and takes one token if there is one.
func (b *bucket) take(now time.Time, rate, burst float64) bool {
	if b.at.IsZero() {
		b.tokens, b.at = burst, now
	}
	if d := now.Sub(b.at).Seconds(); d > 0 {
		b.tokens = min(burst, b.tokens+d*rate)
		b.at = now
	}
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// idle reports whether b would be full now, so forgetting it changes nothing.
func (b *bucket) idle(now time.Time, rate, burst float64) bool {
	return b.tokens+now.Sub(b.at).Seconds()*rate >= burst
}

func (l *cancelLimiter) allow(src string, now time.Time) bool {
	rate, burst, max := l.rate, l.burst, l.max
	if rate <= 0 {
		rate = unknownCancelRate
	}
	if burst <= 0 {
		burst = unknownCancelBurst
	}
	if max <= 0 {
		max = cancelSources
	}
	if l.buckets == nil {
		l.buckets = make(map[string]*bucket)
	}
	b, ok := l.buckets[src]
	if !ok {
		if len(l.buckets) >= max && now.Sub(l.lastSweep) >= time.Second {
			// Forget the buckets that are full again: they hold no state.
			// At most once a second, so a flood of new sources does not
			// make every request walk the table.
			l.lastSweep = now
			for k, v := range l.buckets {
				if v.idle(now, rate, burst) {
					delete(l.buckets, k)
				}
			}
		}
		if len(l.buckets) >= max {
			return l.overflow.take(now, rate, burst)
		}
		b = &bucket{}
		l.buckets[src] = b
	}
	return b.take(now, rate, burst)
}

// sourceKey is the rate-limit identity of a client address: the IPv4
// address, the /64 of an IPv6 address (one host usually holds a whole /64),
// or "unix" for unix-socket clients.
func sourceKey(addr string) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	ip := net.ParseIP(host)
	if ip == nil {
		return "unix"
	}
	if v4 := ip.To4(); v4 != nil {
		return string(v4)
	}
	return string(ip.Mask(net.CIDRMask(64, 128)))
}
