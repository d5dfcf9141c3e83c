package login

import (
	"errors"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
	"github.com/pgmfa/pgmfa/proto/session"
)

// events is an Observer that writes down what it is told.
type events []string

func (e *events) Login(ok bool, path mfa.Path, reason string, d time.Duration) {
	*e = append(*e, fmt.Sprintf("login %v %s %s", ok, path, reason))
}
func (e *events) MFAWaited(result string, d time.Duration) { *e = append(*e, "waited "+result) }
func (e *events) SessionOpened(mode string)                { *e = append(*e, "open "+mode) }
func (e *events) SessionClosed(mode string)                { *e = append(*e, "close "+mode) }
func (e *events) SessionEnded(st Stats) {
	*e = append(*e, fmt.Sprintf("ended %s %d %d", st.Mode, st.ClientToServer, st.ServerToClient))
}
func (e *events) SpliceFallback(err error) { *e = append(*e, "fallback "+err.Error()) }

// Every wait ends exactly once in the observer, however it ends; a session
// is open in one mode at a time and closed once, and a session that never
// started is not closed.
func TestRecordObserver(t *testing.T) {
	log, _ := newLog()
	req := &session.MFARequest{User: "alice"}
	for _, tc := range []struct {
		name string
		run  func(r *Record, m *session.Machine)
		want []string
	}{
		{"approved, spliced", func(r *Record, m *session.Machine) {
			r.Wait(req, func() {})
			r.Decide(m, mfa.PathApproval, mfa.Outcome{OK: true})
			r.StopWaiting()
			r.Audit(m, true, nil)
			r.Started(ModeSockmap)
			r.End(m, Stats{Mode: ModeSockmap, ClientToServer: 1, ServerToClient: 2})
		}, []string{"waited approved", "login true approval ", "open sockmap", "close sockmap", "ended sockmap 1 2"}},
		{"timed out", func(r *Record, m *session.Machine) {
			r.Wait(req, func() {})
			r.TimedOut()
			r.Decide(m, mfa.PathApproval, mfa.Outcome{Reason: mfa.ReasonTimeout, Code: mfa.SQLState})
			r.StopWaiting()
			r.Audit(m, false, errors.New("x"))
		}, []string{"waited timeout", "login false approval timeout"}},
		{"abandoned", func(r *Record, m *session.Machine) {
			r.Wait(req, func() {})
			r.StopWaiting()
			r.StopWaiting()
			r.Audit(m, false, errors.New("client closed"))
		}, []string{"waited abandoned", "login false  "}},
		{"refused approval", func(r *Record, m *session.Machine) {
			r.Wait(req, func() {})
			r.Decide(m, mfa.PathApproval, mfa.Outcome{Reason: mfa.ReasonBadCode, Code: mfa.SQLState})
		}, []string{"waited refused"}},
		{"kernel refused, relayed", func(r *Record, m *session.Machine) {
			r.Decide(m, mfa.PathCode, mfa.Outcome{OK: true})
			r.Audit(m, true, nil)
			r.Started(ModeSockmap)
			r.Fallback(errors.New("no"))
			r.Started(ModeRelay)
			r.End(m, Stats{Mode: ModeRelay})
			r.End(m, Stats{Mode: ModeRelay}) // a second End closes nothing twice
		}, []string{"login true code ", "open sockmap", "fallback no", "close sockmap", "open relay", "close relay", "ended relay 0 0", "ended relay 0 0"}},
		{"handoff failed before a start", func(r *Record, m *session.Machine) {
			r.End(m, Stats{Mode: ModeRelay})
		}, []string{"ended relay 0 0"}},
	} {
		var got events
		r := NewRecord(log, 1, "127.0.0.1:1", nil)
		r.Observe(&got)
		tc.run(r, atMFA(t))
		if !reflect.DeepEqual([]string(got), tc.want) {
			t.Errorf("%s: observed %q, want %q", tc.name, got, tc.want)
		}
	}

	// Without an observer nothing is timed or told (and nothing panics).
	r := NewRecord(log, 2, "", nil)
	r.Wait(req, func() {})
	r.TimedOut()
	r.Started(ModeSockmap)
	r.Fallback(errors.New("no"))
	r.End(atMFA(t), Stats{})
	if !r.waited.IsZero() {
		t.Error("a wait was timed with no observer")
	}
}
