package main

import (
	"bufio"
	"errors"
	"fmt"
	"math"
	"regexp"
	"strconv"
	"strings"
)

// pgbenchResult is what the suite reads from one pgbench run's report.
type pgbenchResult struct {
	TPS          float64 // transactions per second (logins/s under -C)
	Transactions int64
	Failed       int64
	LatencyMS    float64 // "latency average"
	ConnTimeMS   float64 // "initial connection time" or, under -C, "average connection time"
}

var (
	// pgbench prints "-nan", "inf" or a negative rate when its clients took
	// the whole -T to connect; the pattern takes those too so the caller
	// can tell a starved run from a missing report.
	reTPS     = regexp.MustCompile(`^tps = (-?(?:[0-9.]+|nan|inf))`)
	reTxn     = regexp.MustCompile(`^number of transactions actually processed: (\d+)`)
	reFailed  = regexp.MustCompile(`^number of failed transactions: (\d+)`)
	reLatency = regexp.MustCompile(`^latency average = ([0-9.]+) ms`)
	reConn    = regexp.MustCompile(`^(?:initial|average) connection time = ([0-9.]+) ms`)
)

// errStarved is a pgbench report without a usable rate: no transaction
// completed, or connecting the clients took the whole run (tps printed as
// nan, inf or negative). The caller retries such a run for longer.
var errStarved = errors.New("pgbench completed no transactions in its run (connecting took the whole -T)")

// parsePgbench reads pgbench's (PostgreSQL 15) summary. It fails when the
// output has no tps line or reports an error or an aborted run, quoting the
// first error line so the table can show why.
func parsePgbench(out string) (pgbenchResult, error) {
	var r pgbenchResult
	var firstErr string
	seenTPS, seenTxn := false, false
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case firstErr == "" && (strings.HasPrefix(line, "pgbench: error:") || strings.Contains(line, "aborted")):
			firstErr = line
		case reTPS.MatchString(line):
			r.TPS, _ = strconv.ParseFloat(reTPS.FindStringSubmatch(line)[1], 64)
			seenTPS = true
		case reTxn.MatchString(line):
			r.Transactions, _ = strconv.ParseInt(reTxn.FindStringSubmatch(line)[1], 10, 64)
			seenTxn = true
		case reFailed.MatchString(line):
			r.Failed, _ = strconv.ParseInt(reFailed.FindStringSubmatch(line)[1], 10, 64)
		case reLatency.MatchString(line):
			r.LatencyMS, _ = strconv.ParseFloat(reLatency.FindStringSubmatch(line)[1], 64)
		case reConn.MatchString(line):
			r.ConnTimeMS, _ = strconv.ParseFloat(reConn.FindStringSubmatch(line)[1], 64)
		}
	}
	switch {
	case firstErr != "":
		return r, errors.New(firstErr)
	case seenTxn && r.Transactions == 0:
		// pgbench prints no tps line at all when nothing completed.
		return r, errStarved
	case !seenTPS:
		return r, fmt.Errorf("pgbench printed no tps line; it ended with: %q", lastLines(out, 3))
	case !(r.TPS > 0) || math.IsInf(r.TPS, 0):
		return r, errStarved
	case r.Transactions == 0:
		return r, errStarved
	case r.Failed > 0:
		return r, fmt.Errorf("pgbench: %d failed transactions", r.Failed)
	}
	return r, nil
}

// lastLines is the last n non-empty lines of s, joined by " | ".
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
