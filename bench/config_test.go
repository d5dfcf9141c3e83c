package main

import (
	"errors"
	"flag"
	"io"
	"reflect"
	"slices"
	"testing"
	"time"
)

func TestParseConfigSmokeDefaults(t *testing.T) {
	c, err := parseConfig([]string{"-smoke", "-rounds", "2", "-paths", "pgbouncer,direct"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.Duration != time.Second || c.Scale != 1 || c.Sessions != 50 || c.Rounds != 2 {
		t.Errorf("smoke config = %+v (explicit -rounds must win)", c)
	}
	// Paths keep the suite's order, not the user's.
	if !reflect.DeepEqual(c.Paths, []string{pathDirect, pathPgbouncer}) {
		t.Errorf("paths = %v", c.Paths)
	}
}

func TestParseConfigErrors(t *testing.T) {
	for _, args := range [][]string{{"-paths", "nope"}, {"-workloads", "select-3"}, {"-clients", "0"}, {"-rounds", "0"}, {"extra"}} {
		if _, err := parseConfig(args, io.Discard); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
	if _, err := parseConfig([]string{"-help"}, io.Discard); !errors.Is(err, flag.ErrHelp) {
		t.Errorf("-help: %v", err)
	}
	c, err := parseConfig([]string{"-clients", "2,8", "-workloads", "select-8,connect"}, io.Discard)
	if err != nil || !reflect.DeepEqual(c.Workloads, []string{"select-8", "connect"}) {
		t.Errorf("workloads = %v, %v", c.Workloads, err)
	}
}

func TestCopyInWorkloadSelected(t *testing.T) {
	c, err := parseConfig(nil, io.Discard)
	if err != nil || !slices.Contains(c.Workloads, "copy-in") {
		t.Fatalf("default workloads %v (%v) lack copy-in", c.Workloads, err)
	}
	c, err = parseConfig([]string{"-smoke", "-workloads", "copy-in,copy-out"}, io.Discard)
	if err != nil || !reflect.DeepEqual(c.Workloads, []string{"copy-out", "copy-in"}) || c.BulkMB != 20 {
		t.Errorf("smoke copy-in: workloads %v, -bulk-mb %d, %v", c.Workloads, c.BulkMB, err)
	}
	ws := selectedWorkloads(c)
	if len(ws) != 2 || ws[1].Unit != "MB/s" || !ws[1].HigherBetter || !ws[1].Applies(pathSockmap) || !ws[1].Applies(pathPgbouncerTLS) {
		t.Errorf("copy-in workload = %+v", ws)
	}
}
