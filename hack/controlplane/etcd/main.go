// Command etcd is upstream etcd's server entry point, built from the Go module proxy.
//
// go.etcd.io/etcd/server/v3 carries replace directives, so `go install` of upstream's etcd
// command fails outside its repository; a main package of our own that calls etcdmain.Main
// builds the same server from the published modules.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
