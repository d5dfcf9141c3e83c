package session

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmfa/pgmfa/proto"
)

// This file is the AuthAccounts half of the machine: the client's login
// against pgmfa's own verifiers (proto.ServerLogin), then, once MFA passed,
// the upstream login as the account's database role.

// maxAppName is what PostgreSQL keeps of application_name (NAMEDATALEN-1).
const maxAppName = 63

// startAccount sends the first authentication request of the client's
// own login.
func (m *Machine) startAccount() Output {
	method := m.cfg.AccountMethod
	if method == "" {
		method = proto.MethodSCRAM
	}
	if method == proto.MethodPassword && !m.cfg.AllowCleartext && !m.encrypted {
		return m.fail(&proto.AuthError{Code: proto.CodeInvalidAuthorization,
			Message: "pgmfa will not ask for a cleartext password over an unencrypted connection",
			Hint:    "connect with sslmode=require, or start pgmfa with --allow-cleartext-password on a loopback-only setup"})
	}
	var roles *proto.Roles
	if m.cfg.Accounts != nil {
		roles = m.cfg.Accounts.Roles()
	}
	m.srv = proto.NewServerLogin(proto.ServerConfig{Method: method, Roles: roles, User: m.user, Rand: m.cfg.Rand})
	toClient, done := m.srv.Start()
	if done || len(toClient) < 9 {
		// trust, an unknown method or no randomness: never a way in.
		return m.fail(&proto.AuthError{Code: proto.CodeInvalidAuthorization,
			Message: fmt.Sprintf("pgmfa is misconfigured: account authentication method %q", method)})
	}
	switch binary.BigEndian.Uint32(toClient[5:9]) {
	case pgproto3.AuthTypeCleartextPassword:
		m.method = proto.MethodPassword
	case pgproto3.AuthTypeMD5Password:
		m.method = proto.MethodMD5
	default:
		m.method = proto.MethodSCRAM
	}
	m.phase = PhasePassword
	return Output{ToClient: toClient}
}

// accountPacket feeds one client message to the client's own login. When
// the client proved its password, MFA is asked for; the database is not
// dialed before it passed (see MFADecided).
func (m *Machine) accountPacket(buf []byte) (int, Output) {
	msg, n, err := proto.NextMessage(buf, m.cfg.MaxMessageLen)
	if err != nil {
		return 0, m.fail(err)
	}
	if n == 0 {
		return 0, Output{}
	}
	if m.method == proto.MethodPassword && m.code == "" && msg.Type == 'p' {
		// A cleartext password may carry the code at its end, as with
		// AuthPassword; the verifier checks the rest.
		var pm pgproto3.PasswordMessage
		if pm.Decode(msg.Body) == nil {
			if pw, code, ok := SplitCode(pm.Password, m.cfg.CodeDigits); ok {
				m.code, m.source = code, SourcePassword
				msg.Body = append([]byte(pw), 0)
			}
		}
	}
	toClient, done, err := m.srv.Handle(msg)
	if err != nil {
		if errors.Is(err, proto.ErrClientTerminated) {
			return n, m.end(nil)
		}
		return n, m.fail(err)
	}
	if !done {
		return n, Output{ToClient: toClient}
	}
	role, _, ok := m.cfg.Accounts.Upstream(m.user)
	if !ok {
		// Removed between the two lookups, or never mapped.
		return n, m.fail(&proto.AuthError{Code: proto.CodeInvalidAuthorization,
			Message: fmt.Sprintf("account %q has no database role", m.user)})
	}
	if !m.dbSet {
		// As PostgreSQL defaults the database to the user name: the role's.
		m.db = role
	}
	m.phase = PhaseMFA
	return n, Output{ToClient: toClient, NeedMFA: m.mfaRequest()}
}

// dialAccount prepares the upstream login as the account's role, with
// application_name naming the account, and asks for the dial.
func (m *Machine) dialAccount() Output {
	role, password, ok := m.cfg.Accounts.Upstream(m.user)
	if !ok {
		return m.fail(&proto.AuthError{Code: proto.CodeInvalidAuthorization,
			Message: fmt.Sprintf("account %q was removed during its login", m.user)})
	}
	m.up = proto.NewUpstreamLogin(proto.UpstreamConfig{
		User:               role,
		Database:           m.db,
		Password:           password,
		Params:             accountParams(m.startup.Params, m.user),
		ProtocolVersion:    m.startup.ProtocolVersion,
		Rand:               m.cfg.Rand,
		MaxSCRAMIterations: m.cfg.MaxSCRAMIterations,
	})
	m.phase = PhaseDialing
	return Output{Dial: true}
}

// accountParams are the client's startup parameters with application_name
// replaced by "account" or "account/client's name" (cut to what PostgreSQL
// keeps), so pg_stat_activity says whose session it is. A startup
// parameter beats an "options" -c setting of the same name in PostgreSQL,
// so the client cannot override it at login.
func accountParams(params []proto.StartupParam, account string) []proto.StartupParam {
	app := account
	out := make([]proto.StartupParam, 0, len(params)+1)
	for _, p := range params {
		if p.Name == "application_name" {
			if p.Value != "" {
				app = account + "/" + p.Value
			}
			continue
		}
		out = append(out, p)
	}
	if len(app) > maxAppName {
		app = app[:maxAppName]
	}
	return append(out, proto.StartupParam{Name: "application_name", Value: app})
}
