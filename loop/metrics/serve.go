package metrics

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pgmfa/pgmfa/loop/internal/localsock"
)

// Path is where the metrics are served.
const Path = "/metrics"

// Handler serves the metrics on Path and a 404 that says where they are
// on every other path.
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle(Path, promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		// A collector that fails leaves the rest of the scrape intact.
		ErrorHandling: promhttp.ContinueOnError,
		// Bounded: a scraper that opens many scrapes at once queues.
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "404 not found: pgmfa serves its Prometheus metrics at "+Path+" only", http.StatusNotFound)
	})
	return mux
}

// Server returns the HTTP server for Handler, with timeouts that keep a
// slow or idle client from holding a connection for long.
func (m *Metrics) Server() *http.Server {
	return &http.Server{
		Handler:           m.Handler(),
		ReadHeaderTimeout: 5 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
}

// Listen opens the metrics listener for addr: a loopback host:port, or a
// unix-socket path (anything with a slash). Another TCP address is
// refused: the metrics describe the proxy's traffic, and pgmfa does not
// put them on the network; a remote Prometheus scrapes through an agent
// or a reverse proxy on the host. A unix socket is made 0660 (owner and
// group); a stale one left by a process that died is replaced, a live one
// is an error.
func Listen(addr string) (net.Listener, error) {
	if err := CheckAddr(addr); err != nil {
		return nil, err
	}
	if isUnix(addr) {
		return listenUnix(addr)
	}
	return localsock.ListenLoopback("--metrics", addr)
}

// CheckAddr refuses what Listen would refuse without binding: a caller
// checks --metrics before the slow parts of its start-up. A host name
// other than an IP literal passes here and is checked by Listen once it
// has resolved.
func CheckAddr(addr string) error {
	if addr == "" {
		return errors.New("--metrics: empty address")
	}
	if isUnix(addr) {
		return nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--metrics %s: want a loopback host:port (127.0.0.1:9187) or a unix-socket path: %w", addr, err)
	}
	if host == "" {
		return fmt.Errorf("--metrics %s listens on every interface; metrics are served on loopback (e.g. 127.0.0.1%s) or a unix socket only", addr, addr)
	}
	if ip := net.ParseIP(host); ip != nil && !ip.IsLoopback() {
		return fmt.Errorf("--metrics %s is not a loopback address; metrics are served on loopback (127.0.0.1, ::1) or a unix socket only", addr)
	}
	return nil
}

func isUnix(addr string) bool { return strings.Contains(addr, "/") }

// listenUnix: owner and group may connect (a scraping agent in pgmfa's
// group), others may not.
func listenUnix(path string) (net.Listener, error) {
	return localsock.ListenUnix("--metrics", path, 0o660)
}
