// Package admin is pgmfa's admin API, the back end of `pgmfa approve`: a
// small HTTP/JSON service on a unix socket (mode 0600 in a 0700 directory;
// file permissions are the access control) or on a loopback TCP address.
//
//	POST /v1/approve  {"user":"alice","code":"123456","conn_id":0} → {"released":[...]}
//	GET  /v1/pending  → {"pending":[...]}
//	GET  /v1/healthz  → {"ok":true}
//	GET  /v1/stats    → whatever Server.SetStats provides
//
// Errors are {"error": message, "hint": hint, "reason": reason} with a
// fitting HTTP status. Codes are never logged.
package admin
