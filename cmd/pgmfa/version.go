package main

import (
	"fmt"
	"runtime/debug"
)

// version is set by the linker for releases (-X main.version=...).
var version = "dev"

func init() {
	register("version", "print the version and exit", func([]string) int {
		fmt.Println("pgmfa", versionString())
		return 0
	})
}

// versionString is the linker's version, else the module's, else "dev"
// (`pgmfa version`, and pgmfa_build_info).
func versionString() string {
	v := version
	if bi, ok := debug.ReadBuildInfo(); ok && v == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		v = bi.Main.Version
	}
	return v
}
