package main

import (
	"math"
	"strings"
	"testing"
)

func TestMAD(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{0.80, 0.82, 0.95}, 0.02}, // one disturbed round does not widen it
		{[]float64{1, 3}, 1},
		{[]float64{0.5, 0.5, 0.5, 0.5}, 0},
		{[]float64{2, math.NaN(), 4, 6}, 2}, // a failed round is left out
	} {
		if got := mad(c.in); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("mad(%v) = %v, want %v", c.in, got, c.want)
		}
	}
	if got := mad([]float64{0.9}); !math.IsNaN(got) {
		t.Errorf("one round has no spread, got %v", got)
	}
	if got := mad([]float64{0.9, math.NaN()}); !math.IsNaN(got) {
		t.Errorf("one finite round has no spread, got %v", got)
	}
}

// rowOf builds a finished row from per-round ratios (values 1000 x ratio,
// direct at 1000).
func rowOf(workload string, ratios ...float64) *Row {
	r := &Row{Workload: workload, Path: pathSockmap, HigherBetter: true}
	for i, x := range ratios {
		r.Samples = append(r.Samples, Sample{Round: i + 1, Value: 1000 * x, Ratio: x, DeltaToDirect: math.NaN(), CPUSeconds: math.NaN()})
	}
	r.finish()
	return r
}

func TestSettledAndUnsettled(t *testing.T) {
	if !rowOf("select-1", 0.80, 0.81, 0.82).settled(0.03) {
		t.Error("±0.01 should be settled at 0.03")
	}
	if rowOf("select-1", 0.70, 0.80, 0.90).settled(0.03) {
		t.Error("±0.10 should not be settled at 0.03")
	}
	if rowOf("select-1", 0.8).settled(0.03) {
		t.Error("one round has no spread: not settled")
	}
	failed := &Row{Workload: "select-1", Path: pathSockmap, Samples: []Sample{{Value: math.NaN(), Ratio: math.NaN()}}}
	failed.finish()
	if !failed.settled(0.03) {
		t.Error("a path with no figure gains nothing from more rounds")
	}

	ws := []*workload{{Name: "select-1", Applies: everyPath}, {Name: "connect", Applies: everyPath}}
	res := &Results{}
	*res.row(ws[0], pathSockmap) = *rowOf("select-1", 0.80, 0.81, 0.82)
	*res.row(ws[1], pathSockmap) = *rowOf("connect", 0.70, 0.90, 0.99)
	got := unsettled(res, ws, &config{Paths: []string{pathDirect, pathSockmap}, Spread: 0.03})
	if len(got) != 1 || got[0].Name != "connect" {
		t.Errorf("unsettled = %v, want only connect", got)
	}
}

func TestVerdict(t *testing.T) {
	at := target{Workload: "select-1", Kind: "ratio", Bound: 0.98}
	for _, c := range []struct {
		ratios []float64
		want   string
	}{
		{[]float64{0.99, 1.00, 1.01}, "met"},
		{[]float64{0.80, 0.81, 0.82}, "not met"},
		{[]float64{0.97, 0.98, 0.99}, "too noisy"}, // the target is within ±0.01
		{[]float64{1.2}, "too noisy"},              // one round: no spread
		{[]float64{1.30, 1.75, 2.20}, "too noisy"}, // far above, but far too wide to read
		{[]float64{0.30, 0.55, 0.80}, "too noisy"},
	} {
		got, fig := verdict(at, rowOf("select-1", c.ratios...), 0.03)
		if !strings.HasPrefix(got, c.want) {
			t.Errorf("%v: verdict %q (%s), want %q", c.ratios, got, fig, c.want)
		}
	}
	// At most: login latency in ms over direct.
	lat := target{Workload: "login-latency", Kind: "delta", Bound: 0.5}
	r := &Row{Workload: "login-latency", Path: pathSockmap}
	for i, d := range []float64{0.2, 0.3, 0.25} {
		r.Samples = append(r.Samples, Sample{Round: i + 1, Value: 5 + d, Ratio: 5 / (5 + d), DeltaToDirect: d, CPUSeconds: math.NaN()})
	}
	r.finish()
	if got, fig := verdict(lat, r, 0.03); got != "met" {
		t.Errorf("+0.25 ms ±0.05 against 0.5: %q (%s)", got, fig)
	}
}

func TestParseCtxt(t *testing.T) {
	status := "Name:\tpgmfa\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n"
	if n, ok := parseCtxtSwitches(status); !ok || n != 127 {
		t.Errorf("parseCtxtSwitches = %d, %v", n, ok)
	}
	if _, ok := parseCtxtSwitches("Name:\tx\n"); ok {
		t.Error("no counters must not parse")
	}
	if n := parseStatCtxt("cpu  1 2 3\nctxt 987654\nbtime 1\n"); n != 987654 {
		t.Errorf("parseStatCtxt = %d", n)
	}
	g := ctxGroup{map[int]uint64{}, map[int]uint64{}}
	g.see(1, 100, true)  // present at the start: counts from 100
	g.see(2, 30, false)  // born during the run: counts from 0
	g.see(1, 150, false) // 50 more
	if got := g.total(); got != 80 {
		t.Errorf("total = %v, want 80", got)
	}
}

func TestParseLoginTimings(t *testing.T) {
	log := `time=2026-12-01T10:37:16.398Z level=INFO msg=login conn=1 user=bench
time=2026-12-01T10:37:16.399Z level=DEBUG msg="login timing" conn=1 accept_to_loop_us=150 dial_us=230 total_us=20000 in_loop_us=600 spare=false
{"time":"2026-12-01T10:37:16.4Z","level":"DEBUG","msg":"login timing","conn":2,"accept_to_loop_us":250,"dial_us":210,"total_us":22000,"in_loop_us":500,"spare":true}
time=2026-12-01T10:37:16.5Z level=INFO msg="session end" conn=1 duration_us=5
`
	got := parseLoginTimings(log)
	if v := got["accept_to_loop"]; len(v) != 2 || v[0] != 0.15 || v[1] != 0.25 {
		t.Errorf("accept_to_loop = %v", v)
	}
	if v := got["total"]; len(v) != 2 || v[1] != 22 {
		t.Errorf("total = %v", v)
	}
	if v := got["spare"]; len(v) != 2 || v[0] != 0 || v[1] != 1 {
		t.Errorf("spare = %v, want [0 1]", v)
	}
	if _, ok := got["duration"]; ok {
		t.Error("a field of another line was taken")
	}
}

func TestKworkers(t *testing.T) {
	if !isKworker("kworker/1:2-events\n") || isKworker("postgres\n") || isKworker("kswapd0\n") {
		t.Error("isKworker misjudges comm names")
	}
	// A Linux machine always runs kworkers; finding none means the scan
	// is broken and the column would silently read zero.
	if len(kworkerPIDs()) == 0 {
		t.Error("no kworker found in /proc")
	}
}
