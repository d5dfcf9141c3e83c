// Package admin is pgmfa's admin API, the back end of `pgmfa approve`: a
// small HTTP/JSON service on a unix socket or on a loopback TCP address.
//
//	POST /v1/approve  {"user":"alice","code":"123456","conn_id":0,"all":false} → {"released":[...]}
//	GET  /v1/pending  → {"pending":[...]}
//	GET  /v1/healthz  → {"ok":true}
//	GET  /v1/stats    → whatever Server.SetStats provides
//	GET  /v1/sessions → {"sessions":[...]} (live handed-off sessions, Server.SetSessions)
//	POST /v1/sessions/kill {"conn_id":7} → {"ended":{...}}; 404 (reason no_session) for an unknown id
//
// Access control. On the unix socket (mode 0600 in a 0700 directory) file
// permissions decide, and the peer's uid (SO_PEERCRED) names the approver.
// On TCP every request must carry the token of the token file (created 0600
// by `pgmfa serve`) as "Authorization: Bearer TOKEN" (else 401), and its Host
// must be the address the API listens on (else 403: DNS rebinding). On both,
// a request that looks like it came from a web browser — an Origin or
// Sec-Fetch-* header — is refused (403), and a POST must be
// "Content-Type: application/json" (else 415), which no cross-site form can
// send without a CORS preflight this API never answers.
//
// Failed approvals are charged to the approver (the peer's uid, or the
// token), never to the user's failure budget.
//
// Errors are {"error": message, "hint": hint, "reason": reason} with a
// fitting HTTP status; an approval refused because several logins of the
// user wait (409) also carries "pending". Codes and tokens are never logged.
package admin
