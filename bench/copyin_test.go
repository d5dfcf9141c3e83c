package main

import (
	"bytes"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"io"
	"math/big"
	"strings"
	"testing"
	"testing/iotest"
)

func TestAppendCopyInRow(t *testing.T) {
	for _, i := range []int64{1, 9, 10, 12345, 4_629_629} {
		row := string(appendCopyInRow(nil, i))
		num, text, ok := strings.Cut(strings.TrimSuffix(row, "\n"), "\t")
		if !ok || !strings.HasSuffix(row, "\n") || num != fmt.Sprint(i) || len(text) != copyInTextLen {
			t.Fatalf("row %d = %q: want <i>\\t<%d characters>\\n", i, row, copyInTextLen)
		}
		if strings.Trim(text, copyInAlphabet) != "" {
			t.Errorf("row %d has characters outside the alphabet: %q", i, text)
		}
		if again := string(appendCopyInRow([]byte("keep"), i)); again != "keep"+row {
			t.Errorf("row %d not deterministic or clobbers the buffer: %q", i, again)
		}
	}
	if a, b := appendCopyInRow(nil, 1)[2:], appendCopyInRow(nil, 2)[2:]; bytes.Equal(a, b) {
		t.Error("rows 1 and 2 have the same text")
	}
}

func TestCopyInReader(t *testing.T) {
	const rows = 3000 // several 64 KiB batches
	var want []byte
	for i := int64(1); i <= rows; i++ {
		want = appendCopyInRow(want, i)
	}
	// Reads of one byte at a time, of odd sizes, and whole: the same stream.
	for name, r := range map[string]io.Reader{
		"one byte": iotest.OneByteReader(newCopyInReader(rows)),
		"odd":      io.LimitReader(newCopyInReader(rows), 1<<40),
	} {
		got, err := io.ReadAll(r)
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: %d bytes (%v), want %d", name, len(got), err, len(want))
		}
	}
	if err := iotest.TestReader(newCopyInReader(rows), want); err != nil {
		t.Error(err)
	}
	if got, _ := io.ReadAll(newCopyInReader(0)); len(got) != 0 {
		t.Errorf("0 rows gave %d bytes", len(got))
	}
	if n := len(want) / rows; n < copyRowBytes-10 || n > copyRowBytes+10 {
		t.Errorf("rows average %d bytes; copyRowBytes (%d) sizes the workload", n, copyRowBytes)
	}
}

// TestCopyInChecksum checks the checksum against a plain computation of
// what copyInCheckSQL does, and against PostgreSQL 15's own answer to
// copyInCheckSQL after loading rows 1..1000 and 1..1.
func TestCopyInChecksum(t *testing.T) {
	plain := func(rows int64) string {
		sum := new(big.Int)
		for i := int64(1); i <= rows; i++ {
			num, text, _ := strings.Cut(strings.TrimSpace(string(appendCopyInRow(nil, i))), "\t")
			d := md5.Sum([]byte(num + ":" + text))
			v, _ := new(big.Int).SetString(hex.EncodeToString(d[:])[:15], 16)
			sum.Add(sum, v)
		}
		return sum.String()
	}
	for _, rows := range []int64{0, 1, 2, 1000} {
		if got, want := copyInChecksum(rows), plain(rows); got != want {
			t.Errorf("copyInChecksum(%d) = %s, want %s", rows, got, want)
		}
	}
	for rows, pg := range map[int64]string{1: pgChecksum1, 1000: pgChecksum1000} {
		if got := copyInChecksum(rows); got != pg {
			t.Errorf("copyInChecksum(%d) = %s; PostgreSQL computed %s", rows, got, pg)
		}
	}
	// Past 2^64: the carry into the high word.
	hi := new(big.Int).Lsh(big.NewInt(1), 64)
	if s, _ := new(big.Int).SetString(copyInChecksum(100), 10); s.Cmp(hi) <= 0 {
		t.Errorf("100 rows of 60-bit values sum to %v, expected more than 2^64", s)
	}
}

// What PostgreSQL 15 returned for copyInCheckSQL after COPY of
// newCopyInReader(1) and newCopyInReader(1000).
const (
	pgChecksum1    = "940720277803562559"
	pgChecksum1000 = "578222207916438846783"
)

func TestCheckCopyIn(t *testing.T) {
	const sum = "123456789012345678901"
	cases := []struct {
		copied       int64
		count, sum   string
		wantInErrMsg string
	}{
		{100, "100", sum, ""},
		{99, "100", sum, "COPY reported 99 rows"},
		{100, "99", sum, "table holds 99 rows"},
		{100, "100", "1", "rows arrived altered"},
	}
	for _, c := range cases {
		err := checkCopyIn(100, sum, c.copied, c.count, c.sum)
		if (err == nil) != (c.wantInErrMsg == "") || (err != nil && !strings.Contains(err.Error(), c.wantInErrMsg)) {
			t.Errorf("checkCopyIn(copied %d, count %s, sum %s) = %v, want %q", c.copied, c.count, c.sum, err, c.wantInErrMsg)
		}
	}
}
