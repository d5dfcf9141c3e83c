package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"time"
)

// Report is the JSON file: the run's configuration, the machine, what each
// path was (command lines), and every raw sample with its summaries.
type Report struct {
	Started   time.Time         `json:"started"`
	Finished  time.Time         `json:"finished"`
	Machine   Machine           `json:"machine"`
	Config    *config           `json:"config"`
	Paths     []PathInfo        `json:"paths"`
	Workloads []WorkloadInfo    `json:"workloads"`
	Rows      []*Row            `json:"results"`
	Notes     map[string]string `json:"notes"`
}

// PathInfo says how a path was run.
type PathInfo struct {
	Name    string   `json:"name"`
	Desc    string   `json:"description"`
	CmdLine []string `json:"command_line,omitempty"`
	Error   string   `json:"error,omitempty"`
}

// WorkloadInfo says what a workload measures.
type WorkloadInfo struct {
	Name         string `json:"name"`
	Unit         string `json:"unit"`
	HigherBetter bool   `json:"higher_is_better"`
	Desc         string `json:"description"`
}

var reportNotes = map[string]string{
	"ratio":           "value relative to direct measured in the same round; 1.0 = as good as direct, lower is worse (throughput: path/direct; latency: direct/path). Summaries are over rounds: median, min, max.",
	"delta_to_direct": "for lower-is-better units: path minus direct in the same round (e.g. ms a login costs extra)",
	"cpu_seconds":     "user+system CPU of the path's own process (pgmfa or pgbouncer) during the run, from /proc/<pid>/stat",
	"MB":              "10^6 bytes received by the client socket (sent, for copy-in), protocol framing included",
}

// writeJSON writes the report as indented JSON.
func writeJSON(path string, rep *Report) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
