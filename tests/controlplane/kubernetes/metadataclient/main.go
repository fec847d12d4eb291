// metadataclient drives client-go's metadata client (what metadata informers, the garbage
// collector and inventory tools use for any resource) against reqapi's resource through
// kube-apiserver, and prints what it decoded, one JSON line per step:
//
//	metadataclient KUBECONFIG NAMESPACE NAME
//
// A test peer only: it never enters reqapi's runtime.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/tools/clientcmd"
)

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: metadataclient KUBECONFIG NAMESPACE NAME")
		os.Exit(2)
	}
	config, err := clientcmd.BuildConfigFromFlags("", os.Args[1])
	if err != nil {
		fail("kubeconfig", err)
	}
	client := metadata.NewForConfigOrDie(config)
	resource := client.Resource(schema.GroupVersionResource{Group: "k8s.wujiuye.com", Version: "v1beta1",
		Resource: "requests"}).Namespace(os.Args[2])
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	object, err := resource.Get(ctx, os.Args[3], metav1.GetOptions{})
	if err != nil {
		fail("get", err)
	}
	emit(map[string]any{"step": "get", "kind": object.Kind, "apiVersion": object.APIVersion,
		"name": object.Name, "annotations": object.Annotations})

	list, err := resource.List(ctx, metav1.ListOptions{})
	if err != nil {
		fail("list", err)
	}
	names := []string{}
	for _, item := range list.Items {
		names = append(names, item.Name)
	}
	emit(map[string]any{"step": "list", "kind": list.Kind, "names": names,
		"resourceVersion": list.ResourceVersion})

	timeout := int64(2)
	watcher, err := resource.Watch(ctx, metav1.ListOptions{TimeoutSeconds: &timeout})
	if err != nil {
		fail("watch", err)
	}
	for event := range watcher.ResultChan() {
		entry := map[string]any{"step": "watch", "type": string(event.Type)}
		if partial, ok := event.Object.(*metav1.PartialObjectMetadata); ok {
			entry["kind"], entry["name"] = partial.Kind, partial.Name
		} else {
			entry["object"] = fmt.Sprintf("%T %v", event.Object, event.Object)
		}
		emit(entry)
	}
}

func emit(value map[string]any) {
	line, _ := json.Marshal(value)
	fmt.Println(string(line))
}

func fail(step string, err error) {
	emit(map[string]any{"step": step, "error": err.Error()})
	os.Exit(1)
}
