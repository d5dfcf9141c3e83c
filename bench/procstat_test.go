package main

import (
	"os"
	"testing"
)

func TestParseStatCPU(t *testing.T) {
	// A command name with spaces and a ')' must not shift the fields.
	line := "4242 (pg mfa) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 3 0 100 0 0\n"
	got, err := parseStatCPU(line)
	if err != nil || got != 3.25 {
		t.Fatalf("parseStatCPU = %v, %v; want 3.25", got, err)
	}
	if _, err := parseStatCPU("garbage"); err == nil {
		t.Error("garbage parsed")
	}
}

func TestParseVmRSS(t *testing.T) {
	st := "Name:\tpgmfa\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n"
	if got, err := parseVmRSS(st); err != nil || got != 12345 {
		t.Fatalf("parseVmRSS = %v, %v; want 12345", got, err)
	}
	if _, err := parseVmRSS("Name:\tx\n"); err == nil {
		t.Error("missing VmRSS not reported")
	}
}

func TestProcSelf(t *testing.T) {
	if _, err := procCPU(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if kb, err := procRSSKB(os.Getpid()); err != nil || kb <= 0 {
		t.Fatalf("own RSS = %d, %v", kb, err)
	}
}
