package web

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"
)

// Event is what --mfa-webhook receives, as JSON, when a login needs an
// approval. ApprovalURL is the only secret in it: single use, valid until
// Expires.
type Event struct {
	Event       string    `json:"event"` // login_refused (ModeRefer) or login_waiting (ModeWait)
	User        string    `json:"user"`
	ClientAddr  string    `json:"client_addr"`
	Database    string    `json:"database,omitempty"`
	AppName     string    `json:"application_name,omitempty"`
	ApprovalURL string    `json:"approval_url"`
	Expires     time.Time `json:"expires"`
}

// Webhook posts Events to a URL from its own goroutine, retrying with
// backoff; Send never blocks (the gate calls it on the login's path). A
// full queue drops the event (logged, counted in Failed).
type Webhook struct {
	url    string
	client *http.Client
	log    *slog.Logger
	// Backoff is the wait before each retry; its length is the number of
	// retries. Set before the first Send.
	Backoff []time.Duration

	queue  chan Event
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	failed atomic.Uint64
	sent   atomic.Uint64
}

// queueLen bounds the events waiting to be posted.
const queueLen = 256

// NewWebhook starts a Webhook posting to url; Close stops it.
func NewWebhook(url string, logger *slog.Logger) *Webhook {
	if logger == nil {
		logger = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	w := &Webhook{
		url: url, client: &http.Client{Timeout: 10 * time.Second}, log: logger,
		Backoff: []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second},
		queue:   make(chan Event, queueLen), ctx: ctx, cancel: cancel,
	}
	w.wg.Add(1)
	go w.run()
	return w
}

// Send queues e; it never blocks.
func (w *Webhook) Send(e Event) {
	select {
	case w.queue <- e:
	default:
		w.failed.Add(1)
		w.log.Error("mfa webhook: queue full; event dropped", "user", e.User, "client", e.ClientAddr)
	}
}

// Sent and Failed count events delivered and given up on (dropped or out
// of retries).
func (w *Webhook) Sent() uint64   { return w.sent.Load() }
func (w *Webhook) Failed() uint64 { return w.failed.Load() }

// Close stops posting; queued events are dropped.
func (w *Webhook) Close() {
	w.cancel()
	w.wg.Wait()
}

func (w *Webhook) run() {
	defer w.wg.Done()
	for {
		select {
		case <-w.ctx.Done():
			return
		case e := <-w.queue:
			w.deliver(e)
		}
	}
}

// deliver posts e until a 2xx, out of retries, or Close.
func (w *Webhook) deliver(e Event) {
	body, err := json.Marshal(e)
	if err != nil {
		w.failed.Add(1)
		return
	}
	for attempt := 0; ; attempt++ {
		err := w.post(body)
		if err == nil {
			w.sent.Add(1)
			return
		}
		// The URL of the event is a secret: the log names the login only.
		if attempt >= len(w.Backoff) {
			w.failed.Add(1)
			w.log.Error("mfa webhook: giving up on an event", "user", e.User, "client", e.ClientAddr, "attempts", attempt+1, "err", err)
			return
		}
		w.log.Warn("mfa webhook: post failed; retrying", "user", e.User, "client", e.ClientAddr, "attempt", attempt+1, "retry_in", w.Backoff[attempt], "err", err)
		select {
		case <-w.ctx.Done():
			return
		case <-time.After(w.Backoff[attempt]):
		}
	}
}

func (w *Webhook) post(body []byte) error {
	req, err := http.NewRequestWithContext(w.ctx, http.MethodPost, w.url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := w.client.Do(req)
	if err != nil {
		// *url.Error names the webhook's URL, which is often a secret
		// itself (chat services put a token in it): log the cause only.
		var ue *url.Error
		if errors.As(err, &ue) {
			return ue.Err
		}
		return err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("status %s", resp.Status)
	}
	return nil
}
