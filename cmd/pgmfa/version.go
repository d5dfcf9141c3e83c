package main

import (
	"fmt"
	"runtime/debug"
)

// version is set by the linker for releases (-X main.version=...).
var version = "dev"

func init() {
	register("version", "print the version and exit", func([]string) int {
		v := version
		if bi, ok := debug.ReadBuildInfo(); ok && v == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
		fmt.Println("pgmfa", v)
		return 0
	})
}
