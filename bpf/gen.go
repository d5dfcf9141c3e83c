package bpf

// The generated splice_bpfel.go and splice_bpfel.o are committed so that a
// plain `go build` needs no clang; `make generate` rebuilds them. The
// program includes only the pinned header under include/.
//go:generate go tool bpf2go -tags linux -target bpfel -cflags "-O2 -g -Wall -Werror" splice splice.c
