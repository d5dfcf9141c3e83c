// Package metrics is pgmfa's Prometheus exposition (`pgmfa serve
// --metrics`): it counts logins, out-of-band MFA waits, handed-off
// sessions and their bytes, splice fallbacks and store calls as the two
// connection drivers report them (it is their login.Observer and the MFA
// guard's store observer), reads the kernel splicer's own counters at
// scrape time, and serves the lot on /metrics, on loopback or a unix
// socket only.
//
// Every label takes its values from a fixed set known here, so the series
// are bounded whatever the traffic: no label holds a user name, an
// address, a code, a password or an error text. The children of every
// labelled metric are resolved once, in New, so the hooks on the login path
// are an index and an atomic add: no map lookup, no lock, no allocation.
package metrics

import (
	"errors"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/pgmfa/pgmfa/bpf"
	"github.com/pgmfa/pgmfa/loop/login"
	"github.com/pgmfa/pgmfa/loop/spare"
	"github.com/pgmfa/pgmfa/mfa"
)

// Label values of the "mfa" label of pgmfa_logins_total: how MFA was
// decided, or "none" when the login ended before it was.
var paths = []string{string(mfa.PathExempt), string(mfa.PathCode), string(mfa.PathPassword),
	string(mfa.PathRemembered), string(mfa.PathApproval), string(mfa.PathWeb), "none"}

// Label values of pgmfa_mfa_refusals_total's "reason": the MFA outcomes
// that refuse a login, and "other" for any reason this list does not know
// (so a new reason in package mfa cannot add series unnoticed).
var refusals = []string{mfa.ReasonBadCode, mfa.ReasonReplayed, mfa.ReasonThrottled, mfa.ReasonNotEnrolled,
	mfa.ReasonMalformed, mfa.ReasonTimeout, mfa.ReasonBadAccount, mfa.ReasonStore, mfa.ReasonStoreDown,
	mfa.ReasonWebLink, mfa.ReasonDenied, "other"}

// Label values of the approval wait's "result".
var waits = []string{login.WaitApproved, login.WaitRefused, login.WaitTimedOut, login.WaitAbandoned}

// Session modes: the drivers' names and the label values they get.
var modes = []struct{ driver, label string }{
	{login.ModeSockmap, "sockmap"}, {login.ModeRelay, "relay"}, {login.ModeTLSRelay, "tls"},
}

// Label values of pgmfa_splice_fallbacks_total's "reason" (see
// fallbackReason).
const (
	FallbackUnixUpstream = "unix_upstream" // a unix-socket database this kernel cannot splice
	FallbackPeerClosed   = "peer_closed"   // a side closed or reset during the handoff
	FallbackShutdown     = "shutdown"      // the splicer was closing (the proxy stops)
	FallbackOther        = "other"         // anything else; the log line has the error
)

var fallbacks = []string{FallbackUnixUpstream, FallbackPeerClosed, FallbackShutdown, FallbackOther}

// Login durations run from a fraction of a millisecond (an exempt user on
// loopback) to the whole --mfa-timeout of a login waiting for approval.
var loginBuckets = []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300}

// Approval waits are human: seconds to minutes.
var waitBuckets = []float64{.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600}

// Store calls: a file store's synced write, a PostgreSQL round trip, up to
// --store-timeout.
var storeBuckets = []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

// Metrics holds pgmfa's collectors and is the drivers' login.Observer.
// Safe for concurrent use.
type Metrics struct {
	reg *prometheus.Registry

	logins    [2][]prometheus.Counter // [ok][path index]
	refusals  []prometheus.Counter
	loginTime [2]prometheus.Observer // [ok]
	waits     []prometheus.Observer
	open      []prometheus.Gauge   // by mode index
	ended     []prometheus.Counter // by mode index
	bytes     [2][]prometheus.Counter
	fallbacks []prometheus.Counter
	storeTime map[string]prometheus.Observer // by mfa.StoreOps; read-only after New
	storeErrs map[string]prometheus.Counter
}

// Direction indexes of Metrics.bytes.
const (
	toServer = iota
	toClient
)

// New registers pgmfa's metrics, the Go runtime's and the process's, and
// pgmfa_build_info for version.
func New(version string) *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := &Metrics{reg: reg, storeTime: map[string]prometheus.Observer{}, storeErrs: map[string]prometheus.Counter{}}

	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "pgmfa_build_info",
		Help: "Always 1; the labels say which pgmfa is running and the Go release it was built with.",
	}, []string{"version", "goversion"})
	build.WithLabelValues(version, runtime.Version()).Set(1)

	logins := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgmfa_logins_total",
		Help: "Logins that named a user, by result (ok, refused) and how MFA was decided (exempt, code, password, remembered, approval, web; none: the login ended before MFA).",
	}, []string{"result", "mfa"})
	refused := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgmfa_mfa_refusals_total",
		Help: "Logins refused by MFA, by reason (bad_code, replayed, throttled, not_enrolled, malformed, timeout, bad_account, store_error, store_down, web_link, denied, other); throttled ones were refused without checking the code.",
	}, []string{"reason"})
	loginTime := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "pgmfa_login_duration_seconds",
		Help:    "Time from accepting a connection to its login's end (released to the session, or refused), by result; a wait for pgmfa approve is included.",
		Buckets: loginBuckets,
	}, []string{"result"})
	waitTime := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "pgmfa_mfa_approval_wait_seconds",
		Help:    "Time logins without a code waited for pgmfa approve, by how the wait ended (approved, refused, timeout, abandoned).",
		Buckets: waitBuckets,
	}, []string{"result"})
	open := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "pgmfa_sessions_open",
		Help: "Handed-off sessions open now, by mode (sockmap: spliced in the kernel; relay: the user-space relay; tls: the TLS driver's relay).",
	}, []string{"mode"})
	ended := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgmfa_sessions_ended_total",
		Help: "Handed-off sessions that have ended, by mode.",
	}, []string{"mode"})
	bytes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgmfa_session_bytes_total",
		Help: "Bytes moved by handed-off sessions, by direction and mode, counted when a session ends (a spliced session's from the kernel's own counters); an open session's bytes are not in it yet.",
	}, []string{"direction", "mode"})
	fallback := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgmfa_splice_fallbacks_total",
		Help: "Sessions the kernel would not splice, which went to the user-space relay instead, by reason (unix_upstream, peer_closed, shutdown, other).",
	}, []string{"reason"})
	storeTime := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "pgmfa_store_call_duration_seconds",
		Help:    "Duration of the MFA store calls logins make, by operation (load_account, claim_step, failures, add_failure, reset_failures, grant, put_grant); failed calls included.",
		Buckets: storeBuckets,
	}, []string{"op"})
	storeErrs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgmfa_store_errors_total",
		Help: "MFA store calls that failed (the store was unreachable or refused the write), by operation; the logins that needed them were refused.",
	}, []string{"op"})
	reg.MustRegister(build, logins, refused, loginTime, waitTime, open, ended, bytes, fallback, storeTime, storeErrs)

	// Resolve every child now: each then shows from the first scrape (a
	// rate over a series that appears mid-way misses its first count), and
	// the hooks never look a label up.
	for ok, result := range []string{"refused", "ok"} {
		for _, p := range paths {
			m.logins[ok] = append(m.logins[ok], logins.WithLabelValues(result, p))
		}
		m.loginTime[ok] = loginTime.WithLabelValues(result)
	}
	for _, r := range refusals {
		m.refusals = append(m.refusals, refused.WithLabelValues(r))
	}
	for _, w := range waits {
		m.waits = append(m.waits, waitTime.WithLabelValues(w))
	}
	for _, md := range modes {
		m.open = append(m.open, open.WithLabelValues(md.label))
		m.ended = append(m.ended, ended.WithLabelValues(md.label))
		m.bytes[toServer] = append(m.bytes[toServer], bytes.WithLabelValues("client_to_server", md.label))
		m.bytes[toClient] = append(m.bytes[toClient], bytes.WithLabelValues("server_to_client", md.label))
	}
	for _, f := range fallbacks {
		m.fallbacks = append(m.fallbacks, fallback.WithLabelValues(f))
	}
	for _, op := range mfa.StoreOps {
		m.storeTime[op] = storeTime.WithLabelValues(op)
		m.storeErrs[op] = storeErrs.WithLabelValues(op)
	}
	return m
}

// Splicer adds the kernel splicer's counters, read at every scrape; a nil
// splicer (sessions go to the relay) adds nothing.
func (m *Metrics) Splicer(sp *bpf.Splicer) {
	if sp != nil {
		m.reg.MustRegister(spliceCollector{sp})
	}
}

// Spares adds the spare-connection pool's counters (--spare-conns), read
// at every scrape; a nil pool (none) adds nothing.
func (m *Metrics) Spares(p *spare.Pool) {
	if p != nil {
		m.reg.MustRegister(spareCollector{p})
	}
}

// Webhook exposes the --mfa-webhook's counts (loop/web.Webhook), read at
// scrape time: events delivered, and events given up on (out of retries,
// or dropped by a full queue).
func (m *Metrics) Webhook(sent, failed func() uint64) {
	m.reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "pgmfa_mfa_webhook_sent_total",
			Help: "Events --mfa-webhook delivered (a 2xx answer).",
		}, func() float64 { return float64(sent()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "pgmfa_mfa_webhook_failed_total",
			Help: "Events --mfa-webhook gave up on: out of retries, or dropped by a full queue (each is logged).",
		}, func() float64 { return float64(failed()) }),
	)
}

// WebSignIns exposes the approval page's sign-ins (loop/web.Server), read
// at scrape time, by method (totp, passkey) and result (ok, refused).
func (m *Metrics) WebSignIns(count func(method string, ok bool) uint64) {
	for _, method := range []string{"totp", "passkey"} {
		for _, ok := range []bool{true, false} {
			result := "refused"
			if ok {
				result = "ok"
			}
			m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name:        "pgmfa_web_signins_total",
				Help:        "Sign-ins on the approval page (--web), by method (totp, passkey) and result (ok, refused: a wrong or throttled code, a passkey not accepted, replayed, or with a counter gone backwards).",
				ConstLabels: prometheus.Labels{"method": method, "result": result},
			}, func() float64 { return float64(count(method, ok)) }))
		}
	}
}

// Login implements login.Observer.
func (m *Metrics) Login(ok bool, path mfa.Path, reason string, d time.Duration) {
	i := 0
	if ok {
		i = 1
	}
	m.logins[i][index(paths, string(path), len(paths)-1)].Inc()
	m.loginTime[i].Observe(d.Seconds())
	if !ok && reason != "" {
		m.refusals[index(refusals, reason, len(refusals)-1)].Inc()
	}
}

// MFAWaited implements login.Observer.
func (m *Metrics) MFAWaited(result string, d time.Duration) {
	if i := index(waits, result, -1); i >= 0 {
		m.waits[i].Observe(d.Seconds())
	}
}

// SessionOpened implements login.Observer.
func (m *Metrics) SessionOpened(mode string) {
	if i := modeIndex(mode); i >= 0 {
		m.open[i].Inc()
	}
}

// SessionClosed implements login.Observer.
func (m *Metrics) SessionClosed(mode string) {
	if i := modeIndex(mode); i >= 0 {
		m.open[i].Dec()
	}
}

// SessionEnded implements login.Observer.
func (m *Metrics) SessionEnded(st login.Stats) {
	i := modeIndex(st.Mode)
	if i < 0 {
		return
	}
	m.ended[i].Inc()
	m.bytes[toServer][i].Add(float64(st.ClientToServer))
	m.bytes[toClient][i].Add(float64(st.ServerToClient))
}

// SpliceFallback implements login.Observer.
func (m *Metrics) SpliceFallback(err error) {
	m.fallbacks[index(fallbacks, fallbackReason(err), len(fallbacks)-1)].Inc()
}

// StoreCall is the MFA guard's store observer (mfa.Options.OnStoreCall).
func (m *Metrics) StoreCall(op string, took time.Duration, err error) {
	h, ok := m.storeTime[op]
	if !ok {
		return
	}
	h.Observe(took.Seconds())
	if err != nil {
		m.storeErrs[op].Inc()
	}
}

// fallbackReason sorts Splice's error into a bounded reason. Package bpf
// has sentinels for a closed splicer and a peer that already closed; its
// other refusals are told apart by their words, which the tests of this
// package pin (metrics_test.go).
func fallbackReason(err error) string {
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	switch {
	case errors.Is(err, bpf.ErrClosed):
		return FallbackShutdown
	case strings.Contains(msg, "unix-socket upstream"):
		return FallbackUnixUpstream
	case errors.Is(err, bpf.ErrNotEstablished), strings.Contains(msg, "received FIN"),
		errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ECONNRESET):
		return FallbackPeerClosed
	}
	return FallbackOther
}

func index(set []string, v string, dflt int) int {
	for i, s := range set {
		if s == v {
			return i
		}
	}
	return dflt
}

func modeIndex(mode string) int {
	for i, md := range modes {
		if md.driver == mode {
			return i
		}
	}
	return -1
}
