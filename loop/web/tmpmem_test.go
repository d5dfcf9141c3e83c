package web

// TEMPORARY until the FileStore implements mfa.PasskeyStore (h/pkstore).

import (
	"bytes"
	"sync"
	"time"

	"github.com/pgmfa/pgmfa/mfa"
)

type memPK struct {
	mu    sync.Mutex
	pks   map[string][]mfa.Passkey
	links map[string]memLink
	fs    *mfa.FileStore
}
type memLink struct {
	user    string
	expires time.Time
	used    bool
}

func (m *memPK) UserPasskeys(user string) ([]mfa.Passkey, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]mfa.Passkey(nil), m.pks[user]...), nil
}
func (m *memPK) PasskeyByID(id []byte) (string, mfa.Passkey, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for u, ps := range m.pks {
		for _, p := range ps {
			if bytes.Equal(p.ID, id) {
				return u, p, true, nil
			}
		}
	}
	return "", mfa.Passkey{}, false, nil
}
func (m *memPK) AddPasskeyLink(user string, th []byte, exp time.Time) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.links[string(th)] = memLink{user: user, expires: exp}
	return nil
}
func (m *memPK) PasskeyLink(th []byte, now time.Time) (string, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, ok := m.links[string(th)]
	if !ok || l.used || !now.Before(l.expires) {
		return "", false, nil
	}
	return l.user, true, nil
}
func (m *memPK) EnrollPasskey(th []byte, now time.Time, p mfa.Passkey) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l, ok := m.links[string(th)]
	if !ok || l.used || !now.Before(l.expires) {
		return "", mfa.ErrLinkInvalid
	}
	l.used = true
	m.links[string(th)] = l
	m.pks[l.user] = append(m.pks[l.user], p)
	return l.user, nil
}
func (m *memPK) SetSignCount(id []byte, old, new uint32) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, ps := range m.pks {
		for i := range ps {
			if bytes.Equal(ps[i].ID, id) && ps[i].SignCount == old {
				ps[i].SignCount = new
				return true, nil
			}
		}
	}
	return false, nil
}
func (m *memPK) RemovePasskeys(user string) (int, error) { return 0, nil }
