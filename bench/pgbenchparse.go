package main

import (
	"bufio"
	"errors"
	"fmt"
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
	reTPS     = regexp.MustCompile(`^tps = ([0-9.]+)`)
	reTxn     = regexp.MustCompile(`^number of transactions actually processed: (\d+)`)
	reFailed  = regexp.MustCompile(`^number of failed transactions: (\d+)`)
	reLatency = regexp.MustCompile(`^latency average = ([0-9.]+) ms`)
	reConn    = regexp.MustCompile(`^(?:initial|average) connection time = ([0-9.]+) ms`)
)

// parsePgbench reads pgbench's (PostgreSQL 15) summary. It fails when the
// output has no tps line or reports an error or an aborted run, quoting the
// first error line so the table can show why.
func parsePgbench(out string) (pgbenchResult, error) {
	var r pgbenchResult
	var firstErr string
	seenTPS := false
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
	case !seenTPS:
		return r, errors.New("pgbench printed no tps line")
	case r.Transactions == 0:
		return r, errors.New("pgbench completed no transactions")
	case r.Failed > 0:
		return r, fmt.Errorf("pgbench: %d failed transactions", r.Failed)
	}
	return r, nil
}
