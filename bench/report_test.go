package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteJSON(t *testing.T) {
	res := sampleResults()
	path := filepath.Join(t.TempDir(), "sub", "results.json")
	rep := &Report{Config: &config{Rounds: 2}, Rows: res.Rows, Notes: reportNotes}
	if err := writeJSON(path, rep); err != nil {
		t.Fatalf("writeJSON (NaN figures must not break it): %v", err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var back struct {
		Results []struct {
			Workload string
			Path     string
			Samples  []struct {
				Value *float64
				Ratio *float64
				Error string
			}
			Ratio struct{ Median *float64 }
		}
	}
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	for _, r := range back.Results {
		if r.Workload == "select-16" && r.Path == pathSockmap {
			if r.Samples[0].Value != nil || r.Samples[0].Error != "boom" || r.Ratio.Median != nil {
				t.Errorf("failed sample not written as null + error: %+v", r)
			}
		}
		if r.Workload == "select-16" && r.Path == pathPgbouncer && (r.Samples[0].Ratio == nil || *r.Samples[0].Ratio != 0.6) {
			t.Errorf("pgbouncer round 1 ratio = %v, want 0.6", r.Samples[0].Ratio)
		}
	}
}
