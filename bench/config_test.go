package main

import (
	"errors"
	"flag"
	"io"
	"reflect"
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
