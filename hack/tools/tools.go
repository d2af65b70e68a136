//go:build tools

// Package tools pins the real Kubernetes binaries that Terrace's test cluster
// runs. hack/build-tools.sh builds each of them from this module into a cache
// keyed by the versions in go.mod, outside the clone.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
