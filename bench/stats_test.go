package main

import (
	"math"
	"testing"
)

func TestSummarize(t *testing.T) {
	cases := []struct {
		in            []float64
		med, min, max float64
		n             int
	}{
		{[]float64{3, 1, 2}, 2, 1, 3, 3},
		{[]float64{4, 1, 3, 2}, 2.5, 1, 4, 4},
		{[]float64{5}, 5, 5, 5, 1},
		{[]float64{math.NaN(), 7, 9}, 8, 7, 9, 2},
	}
	for _, c := range cases {
		s := summarize(c.in)
		if s.Median != c.med || s.Min != c.min || s.Max != c.max || s.N != c.n {
			t.Errorf("summarize(%v) = %+v, want median %v min %v max %v n %d", c.in, s, c.med, c.min, c.max, c.n)
		}
	}
	if s := summarize([]float64{math.NaN()}); s.N != 0 || !math.IsNaN(s.Median) {
		t.Errorf("all-NaN summary = %+v, want N=0 and NaN median", s)
	}
}

func TestRatioToDirect(t *testing.T) {
	if r := ratioToDirect(50, 100, true); r != 0.5 {
		t.Errorf("throughput ratio = %v, want 0.5", r)
	}
	// Twice the latency of direct is half as good.
	if r := ratioToDirect(4, 2, false); r != 0.5 {
		t.Errorf("latency ratio = %v, want 0.5", r)
	}
	if r := ratioToDirect(1, math.NaN(), true); !math.IsNaN(r) {
		t.Errorf("ratio without direct = %v, want NaN", r)
	}
	if r := ratioToDirect(0, 1, true); !math.IsNaN(r) {
		t.Errorf("ratio of a zero figure = %v, want NaN", r)
	}
}

func TestRotate(t *testing.T) {
	s := []string{"a", "b", "c"}
	if got := rotate(s, 4); len(got) != 3 || got[0] != "b" || got[2] != "a" {
		t.Errorf("rotate = %v", got)
	}
	if s[0] != "a" {
		t.Error("rotate changed its input")
	}
}
