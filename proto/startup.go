package proto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// StartupParam is one name/value pair of a StartupMessage.
type StartupParam struct {
	Name, Value string
}

// StartupMessage is a StartupMessage (protocol 3.0 or 3.2) that keeps its
// parameters the way the client sent them: in order, duplicates included.
//
// pgproto3.StartupMessage keeps them in a map, which loses both, and
// PostgreSQL depends on both: it applies setting parameters in the order
// they come, so of "search_path=a" and "SEARCH_PATH=b" the later wins; of a
// repeated "user", "database" or "options" it keeps the last (verified
// against PostgreSQL 15: ProcessStartupPacket overwrites those three and
// appends every other parameter to its list of settings). A proxy that
// re-encodes from a map changes what the client asked for, so this type
// carries the list and its own layout; the layout is PostgreSQL's.
type StartupMessage struct {
	ProtocolVersion uint32
	Params          []StartupParam
}

// Frontend identifies this message as sendable by a frontend.
func (*StartupMessage) Frontend() {}

// Decode decodes the packet's body: the version, then name/value pairs
// ending in one NUL (the layout NextStartup checks).
func (dst *StartupMessage) Decode(src []byte) error {
	if len(src) < 4 {
		return errors.New("startup message too short")
	}
	dst.ProtocolVersion = binary.BigEndian.Uint32(src)
	dst.Params = nil
	rest := src[4:]
	for {
		i := bytes.IndexByte(rest, 0)
		if i < 0 {
			return errors.New("missing terminator")
		}
		if i == 0 {
			if len(rest) != 1 {
				return errors.New("expected terminator as last byte")
			}
			return nil
		}
		name := string(rest[:i])
		rest = rest[i+1:]
		j := bytes.IndexByte(rest, 0)
		if j < 0 {
			return fmt.Errorf("missing value for %q", truncate([]byte(name)))
		}
		dst.Params = append(dst.Params, StartupParam{Name: name, Value: string(rest[:j])})
		rest = rest[j+1:]
	}
}

// Encode appends the packet, parameters in their order, to dst. A name that
// is empty or a name or value holding a NUL cannot be encoded.
func (src *StartupMessage) Encode(dst []byte) ([]byte, error) {
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0)
	dst = binary.BigEndian.AppendUint32(dst, src.ProtocolVersion)
	for _, p := range src.Params {
		if p.Name == "" || strings.IndexByte(p.Name, 0) >= 0 || strings.IndexByte(p.Value, 0) >= 0 {
			return nil, errors.New("startup parameter with an empty name or a NUL byte")
		}
		dst = append(append(dst, p.Name...), 0)
		dst = append(append(dst, p.Value...), 0)
	}
	dst = append(dst, 0)
	binary.BigEndian.PutUint32(dst[start:], uint32(len(dst)-start))
	return dst, nil
}

// Get returns the value of the last parameter called name, compared
// exactly (as PostgreSQL compares "user", "database" and "options"), and
// whether there is one.
func (m *StartupMessage) Get(name string) (string, bool) {
	for i := len(m.Params) - 1; i >= 0; i-- {
		if m.Params[i].Name == name {
			return m.Params[i].Value, true
		}
	}
	return "", false
}
