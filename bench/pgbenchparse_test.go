package main

import (
	"errors"
	"os"
	"strings"
	"testing"
)

func TestParsePgbench(t *testing.T) {
	cases := []struct {
		file         string
		tps, latency float64
		txn          int64
		conn         float64
	}{
		{"pgbench_select.txt", 14375.614093, 0.139, 13519, 62.258},
		{"pgbench_prepared.txt", 0, 0, 0, 0},
		{"pgbench_connect.txt", 0, 0, 0, 0},
	}
	for _, c := range cases {
		b, err := os.ReadFile("testdata/" + c.file)
		if err != nil {
			t.Fatal(err)
		}
		r, err := parsePgbench(string(b))
		if err != nil {
			t.Fatalf("%s: %v", c.file, err)
		}
		if r.TPS <= 0 || r.Transactions <= 0 || r.LatencyMS <= 0 || r.ConnTimeMS <= 0 {
			t.Errorf("%s: incomplete parse %+v", c.file, r)
		}
		if c.tps != 0 && (r.TPS != c.tps || r.LatencyMS != c.latency || r.Transactions != c.txn || r.ConnTimeMS != c.conn) {
			t.Errorf("%s: got %+v, want tps %v latency %v txn %d conn %v", c.file, r, c.tps, c.latency, c.txn, c.conn)
		}
	}
}

func TestParsePgbenchErrors(t *testing.T) {
	b, err := os.ReadFile("testdata/pgbench_refused.txt")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parsePgbench(string(b)); err == nil || !strings.Contains(err.Error(), "Connection refused") {
		t.Errorf("refused run: err = %v, want the connection error", err)
	}
	if _, err := parsePgbench("garbage\n"); err == nil {
		t.Error("garbage parsed without error")
	}
	failed := "number of transactions actually processed: 10\nnumber of failed transactions: 2 (16.7%)\ntps = 10.0 (without initial connection time)\n"
	if _, err := parsePgbench(failed); err == nil {
		t.Error("failed transactions not reported")
	}
	// Clients that take the whole -T to connect leave pgbench dividing by
	// a zero or negative duration; such a run must read as starved (the
	// caller retries it), not as a missing report.
	// PostgreSQL 15's pgbench when no transaction completed in -T: no tps
	// line at all (seen in CI with 64 clients and -T 1).
	none := "duration: 1 s\nnumber of transactions actually processed: 0\nnumber of failed transactions: 0 (NaN%)\n"
	if _, err := parsePgbench(none); !errors.Is(err, errStarved) {
		t.Errorf("no transactions: err = %v, want errStarved", err)
	}
	for _, tps := range []string{"-nan", "inf", "-1234.5", "0.000000"} {
		starved := "number of transactions actually processed: 3\ninitial connection time = 1200.0 ms\ntps = " + tps + " (without initial connection time)\n"
		if _, err := parsePgbench(starved); !errors.Is(err, errStarved) {
			t.Errorf("tps = %s: err = %v, want errStarved", tps, err)
		}
	}
}
