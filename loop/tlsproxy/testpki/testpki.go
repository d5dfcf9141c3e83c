// Package testpki makes a throwaway PKI for tests: a CA, a certificate for
// localhost/127.0.0.1 signed by it (usable by the proxy and by a TLS
// PostgreSQL alike), and an unrelated CA for the wrong-CA cases. Tests and
// the benchmark suite's TLS paths use it; the proxy itself never does.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// PKI is a set of PEM files in Dir.
type PKI struct {
	Dir                       string
	CAFile, CertFile, KeyFile string
	OtherCAFile               string
	Pool                      *x509.CertPool // holds the CA
}

// New writes a fresh PKI into a new temp dir; Close removes it.
func New() (*PKI, error) {
	dir, err := os.MkdirTemp("", "pgmfa-pki-")
	if err != nil {
		return nil, err
	}
	p := &PKI{Dir: dir, Pool: x509.NewCertPool()}
	caCert, caKey, caPEM, err := newCA("pgmfa test CA")
	if err != nil {
		return nil, err
	}
	p.Pool.AddCert(caCert)
	_, _, otherPEM, err := newCA("some other CA")
	if err != nil {
		return nil, err
	}
	certPEM, keyPEM, err := newLeaf(caCert, caKey, "localhost", []string{"localhost"}, []net.IP{net.ParseIP("127.0.0.1")})
	if err != nil {
		return nil, err
	}
	p.CAFile = filepath.Join(dir, "ca.pem")
	p.OtherCAFile = filepath.Join(dir, "other-ca.pem")
	p.CertFile = filepath.Join(dir, "server.pem")
	p.KeyFile = filepath.Join(dir, "server.key")
	for f, b := range map[string][]byte{p.CAFile: caPEM, p.OtherCAFile: otherPEM, p.CertFile: certPEM, p.KeyFile: keyPEM} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// Close removes the files.
func (p *PKI) Close() error { return os.RemoveAll(p.Dir) }

func newCA(name string) (*x509.Certificate, *ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, nil, err
	}
	return cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

func newLeaf(ca *x509.Certificate, caKey *ecdsa.PrivateKey, cn string, dns []string, ips []net.IP) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     dns,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, nil, err
	}
	kb, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kb}), nil
}
