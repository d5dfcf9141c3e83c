package main

import (
	"bytes"
	"encoding/xml"
	"io"
	"math"
	"strings"
	"testing"
)

// sampleResults builds two rounds of two workloads on three paths, one of
// them failed everywhere.
func sampleResults() *Results {
	res := &Results{}
	tps := &workload{Name: "select-16", Unit: "tps", HigherBetter: true}
	lat := &workload{Name: "login-latency", Unit: "ms/login"}
	add := func(w *workload, path string, vals ...float64) {
		r := res.row(w, path)
		for i, v := range vals {
			s := Sample{Round: i + 1, Value: v, CPUSeconds: math.NaN()}
			if math.IsNaN(v) {
				s.Err = "boom"
			}
			r.Samples = append(r.Samples, s)
		}
	}
	add(tps, pathDirect, 1000, 1200)
	add(tps, pathPgbouncer, 600, 600)
	add(tps, pathSockmap, math.NaN(), math.NaN())
	add(lat, pathDirect, 2, 4)
	add(lat, pathPgbouncer, 4, 5)
	add(lat, pathSockmap, 3, 5)
	res.relate()
	return res
}

func TestRelate(t *testing.T) {
	res := sampleResults()
	pb := res.find("select-16", pathPgbouncer)
	// Same-round ratios 0.6 and 0.5: median 0.55.
	if got := pb.Ratio; math.Abs(got.Median-0.55) > 1e-9 || got.Min != 0.5 || got.Max != 0.6 {
		t.Errorf("pgbouncer ratio = %+v, want median 0.55 min 0.5 max 0.6", got)
	}
	lat := res.find("login-latency", pathSockmap)
	// Deltas 1 and 1 ms; ratios 2/3 and 4/5.
	if lat.Delta.Median != 1 || math.Abs(lat.Ratio.Min-2.0/3) > 1e-9 {
		t.Errorf("latency delta/ratio = %+v / %+v", lat.Delta, lat.Ratio)
	}
	if f := res.find("select-16", pathSockmap); f.Value.N != 0 || len(f.Errors()) != 1 {
		t.Errorf("failed row = %+v", f)
	}
}

func TestRenderSVG(t *testing.T) {
	svg := renderSVG(sampleResults(), allPaths, "title <&>", "sub")
	// Well-formed XML.
	d := xml.NewDecoder(bytes.NewReader(svg))
	for {
		if _, err := d.Token(); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("SVG is not well-formed XML: %v", err)
		}
	}
	s := string(svg)
	for _, want := range []string{"select-16", "login-latency", pathColours[pathPgbouncer], pathColours[pathSockmap], "direct = 1.0", "error", "title &lt;&amp;&gt;", "0.55"} {
		if !strings.Contains(s, want) {
			t.Errorf("SVG lacks %q", want)
		}
	}
	// Direct is the reference line, not a bar.
	if strings.Contains(s, "/ direct:") {
		t.Error("direct drawn as a bar")
	}
}

func TestWriteTable(t *testing.T) {
	var b bytes.Buffer
	writeTable(&b, sampleResults(), &config{Rounds: 2, MaxRounds: 2, Spread: 0.03})
	out := b.String()
	for _, want := range []string{"select-16", "pgbouncer", "0.55 ±0.05 ?", "+1.00 ±0.00 ms", "too noisy to read", "ERROR", "errors:", "pgmfa-sockmap [select-16]: boom"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}
