package loop

import (
	"encoding/binary"
	"sync"

	"github.com/jackc/pgx/v5/pgproto3"
)

// cancelMap maps the cancel keys the proxy issued to the database's own
// keys. Clients only ever see the proxy's keys, so a key captured from one
// session cannot be used against the database directly, and a key the
// proxy did not issue is never forwarded.
type cancelMap struct {
	mu sync.Mutex
	m  map[string]*pgproto3.BackendKeyData
}

func keyString(pid uint32, secret []byte) string {
	b := make([]byte, 4, 4+len(secret))
	binary.BigEndian.PutUint32(b, pid)
	return string(append(b, secret...))
}

func (cm *cancelMap) add(proxy, upstream *pgproto3.BackendKeyData) {
	if proxy == nil || upstream == nil {
		return
	}
	cm.mu.Lock()
	defer cm.mu.Unlock()
	if cm.m == nil {
		cm.m = make(map[string]*pgproto3.BackendKeyData)
	}
	cm.m[keyString(proxy.ProcessID, proxy.SecretKey)] = upstream
}

func (cm *cancelMap) remove(proxy *pgproto3.BackendKeyData) {
	if proxy == nil {
		return
	}
	cm.mu.Lock()
	defer cm.mu.Unlock()
	delete(cm.m, keyString(proxy.ProcessID, proxy.SecretKey))
}

func (cm *cancelMap) lookup(pid uint32, secret []byte) (*pgproto3.BackendKeyData, bool) {
	cm.mu.Lock()
	defer cm.mu.Unlock()
	up, ok := cm.m[keyString(pid, secret)]
	return up, ok
}
