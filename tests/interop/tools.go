//go:build tools

// Package interop pins the upstream binaries this harness builds and runs
// (`go build sigs.k8s.io/apiserver-network-proxy/cmd/agent` and `.../cmd/server`).
package interop

import (
	_ "sigs.k8s.io/apiserver-network-proxy/cmd/agent/app"
	_ "sigs.k8s.io/apiserver-network-proxy/cmd/server/app"
)
