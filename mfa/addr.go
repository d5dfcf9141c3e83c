package mfa

import (
	"net"
	"net/netip"
)

// clientIP reduces a client address to what identifies the client: the IP
// of "ip:port" (IPv4-mapped IPv6 unmapped), or the whole string for a unix
// socket path, "admin" and the like. Unix-socket clients usually have no
// address at all; they share the key "unix".
func clientIP(addr string) string {
	if addr == "" || addr == "@" {
		return "unix"
	}
	host := addr
	if h, _, err := net.SplitHostPort(addr); err == nil {
		host = h
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		return ip.Unmap().WithZone("").String()
	}
	return host
}

// throttleKey is the key failures per address are counted under. An IPv6
// client usually controls a whole /64, so counting per address there would
// give it 2^64 fresh budgets; the /64 is the unit instead.
func throttleKey(addr string) string {
	ip := clientIP(addr)
	if a, err := netip.ParseAddr(ip); err == nil && a.Is6() {
		p, _ := a.Prefix(64)
		return p.String()
	}
	return ip
}

// rememberKey is the key of a remembered success: the exact user and IP.
func rememberKey(user, addr string) string {
	return user + "\x00" + clientIP(addr)
}
