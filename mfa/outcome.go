package mfa

import (
	"fmt"
	"strings"
	"time"

	"github.com/pgmfa/pgmfa/proto"
)

// Path says how MFA was satisfied (for the audit log).
type Path string

// The ways a login can satisfy MFA.
const (
	PathCode       Path = "code"       // a code that arrived with the login (startup option)
	PathPassword   Path = "password"   // code split from the password (--auth password)
	PathApproval   Path = "approval"   // pgmfa approve
	PathRemembered Path = "remembered" // --mfa-remember
	PathExempt     Path = "exempt"     // --mfa-exempt or --mfa off
	PathWeb        Path = "web"        // approved on the approval page (--web), or refused with its link
)

// SQLState is the SQLSTATE of every MFA refusal: invalid_authorization_specification.
const SQLState = proto.CodeInvalidAuthorization

// Reasons in Outcome.Reason: short machine words for logs.
const (
	ReasonRemembered  = "remembered"      // OK: the pool rule (the code just accepted for this user and address)
	ReasonBadCode     = "bad_code"        // the code matches no step in the window
	ReasonReplayed    = "replayed"        // the code's step was already used
	ReasonThrottled   = "throttled"       // too many recent failures; the code was not checked
	ReasonNotEnrolled = "not_enrolled"    // the user has no secret
	ReasonMalformed   = "malformed"       // not the account's number of digits
	ReasonTimeout     = "timeout"         // nobody approved the waiting login in time
	ReasonNotWaiting  = "not_waiting"     // Approvals.Approve: no such login is waiting
	ReasonBadAccount  = "bad_account"     // the stored enrollment is unusable (hand-edited store)
	ReasonStore       = "store_error"     // the store could not record the accepted code; refused (fail closed)
	ReasonStoreDown   = "store_down"      // the store could not be read (unreachable); refused (fail closed)
	ReasonSeveral     = "several_waiting" // Approvals.Approve: several logins of the user wait; none released
	ReasonWebLink     = "web_link"        // refused with a link to the approval page (--web): approve there, then retry
	ReasonDenied      = "denied"          // denied by its user on the approval page
)

// Outcome of a verification. When !OK, Code is the SQLSTATE (28000), Message
// and Hint are what the client sees, and Reason is a short machine word for
// logs (see the Reason constants). An OK outcome has an empty Reason except on
// the connection-pool path (ReasonRemembered).
type Outcome struct {
	OK      bool
	Reason  string
	Code    string
	Message string
	Hint    string
}

// ok is the plain success.
var ok = Outcome{OK: true}

func refuse(reason, msg, hint string) Outcome {
	return Outcome{Reason: reason, Code: SQLState, Message: msg, Hint: hint}
}

// codeHint tells the user how to send a code; the proxy's auth mode is not
// known here, so it names the way that always works.
func codeHint(digits int, what string) string {
	return fmt.Sprintf("%s: PGOPTIONS='-c pgmfa.code=%s'", what, strings.Repeat("N", digits))
}

func badCode(user string, p params) Outcome {
	return refuse(ReasonBadCode,
		fmt.Sprintf("MFA code for user %q is not valid", user),
		codeHint(p.digits, fmt.Sprintf("send the current code from your authenticator app (it changes every %ds; check the device's clock)", p.period)))
}

func malformed(user string, p params) Outcome {
	return refuse(ReasonMalformed,
		fmt.Sprintf("MFA code for user %q must be %d digits", user, p.digits),
		codeHint(p.digits, "send the current code from your authenticator app"))
}

func replayed(user string, p params) Outcome {
	return refuse(ReasonReplayed,
		fmt.Sprintf("MFA code for user %q was already used; each code works once", user),
		codeHint(p.digits, fmt.Sprintf("wait for the next code (every %ds) and send it", p.period))+
			"; a connection pool that opens many connections with one code needs the server's --mfa-remember")
}

// NotEnrolled is the refusal for a user with no secret.
func NotEnrolled(user string) Outcome {
	return refuse(ReasonNotEnrolled,
		fmt.Sprintf("user %q has no MFA secret enrolled", user),
		"ask an administrator to run: pgmfa enroll "+user)
}

func throttled(user string, byUser bool, until, now time.Time) Outcome {
	who := "from this address"
	if byUser {
		who = fmt.Sprintf("for user %q", user)
	}
	wait := until.Sub(now).Round(time.Second)
	if wait < time.Second {
		wait = time.Second
	}
	return refuse(ReasonThrottled,
		fmt.Sprintf("too many failed MFA attempts %s; the code was not checked", who),
		fmt.Sprintf("try again after %s (in %v) with a fresh code", until.UTC().Format("15:04:05 UTC"), wait))
}

// badAccount does not carry the store's error to the client: the operator
// sees it when the store is loaded.
func badAccount(user string) Outcome {
	return refuse(ReasonBadAccount,
		fmt.Sprintf("the MFA enrollment of user %q is unusable", user),
		"ask an administrator to re-enroll: pgmfa enroll --force "+user)
}

// storeFailed is the refusal when the store could not take the code's step:
// the code may not be accepted without recording it (single use), so the
// login fails closed.
func storeFailed(user string) Outcome {
	return refuse(ReasonStore,
		fmt.Sprintf("pgmfa could not record the MFA code of user %q in its store; the login was refused", user),
		"try again with the next code; if it keeps failing, an administrator should check pgmfa's log and its --store")
}

// approverThrottled is the refusal of an approval once its approver used up
// its failure budget.
func approverThrottled(until, now time.Time) Outcome {
	wait := until.Sub(now).Round(time.Second)
	if wait < time.Second {
		wait = time.Second
	}
	return refuse(ReasonThrottled,
		"too many failed approvals from this approver; the code was not checked",
		fmt.Sprintf("try again after %s (in %v) with a fresh code; the user's own logins are not affected", until.UTC().Format("15:04:05 UTC"), wait))
}

// storeDown is the refusal when the store cannot be read (a PostgreSQL
// store that is unreachable): nothing can be checked, so the login fails
// closed. The store's error goes to pgmfa's log, not to the client.
func storeDown(user string) Outcome {
	return refuse(ReasonStoreDown,
		fmt.Sprintf("pgmfa cannot reach its MFA store, so the second factor of user %q cannot be checked; the login was refused", user),
		"try again in a moment: pgmfa reconnects on its own when the store is back; if it persists, an administrator should check the store's database (pgmfa's log has the error)")
}
