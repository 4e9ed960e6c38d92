// Interop checks with clients nobody on this project wrote: Apache
// kafka-clients and the CloudEvents Java SDK's Kafka binding. Run with Java's
// source launcher on the classpath that pom.xml resolves:
//
//   java -cp '<interop-libs>/*' Interop.java read <brokers> <topic> <count>
//   java -cp '<interop-libs>/*' Interop.java write <brokers> <topic> <count> <type>
//   java -cp '<interop-libs>/*' Interop.java partitions <brokers> <topic> <key>...
//
// read:       reads <count> records from the start of every partition and
//             parses each as a CloudEvent (binary mode); prints one JSON object
//             per event. A record the SDK rejects exits 3 with its reason.
// write:      produces <count> CloudEvents (binary mode, JSON data {"seq": i},
//             keys k0..k9) with the SDK's serializer; prints each id.
// partitions: produces one record per key with the Java producer's default
//             partitioner; prints "<key>\t<partition>" per key.
import io.cloudevents.CloudEvent;
import io.cloudevents.core.builder.CloudEventBuilder;
import io.cloudevents.kafka.CloudEventDeserializer;
import io.cloudevents.kafka.CloudEventSerializer;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.time.OffsetDateTime;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;

public class Interop {
  public static void main(String[] args) throws Exception {
    if (args.length < 3) {
      System.err.println("usage: Interop read|write|partitions <brokers> <topic> ...");
      System.exit(2);
    }
    switch (args[0]) {
      case "read" -> read(args[1], args[2], Integer.parseInt(args[3]),
          args.length > 4 ? args[4] : "read_uncommitted");
      case "write" -> write(args[1], args[2], Integer.parseInt(args[3]), args[4]);
      case "partitions" -> partitions(args[1], args[2], List.of(args).subList(3, args.length));
      default -> {
        System.err.println("unknown mode " + args[0]);
        System.exit(2);
      }
    }
  }

  // Reads the topic from the beginning with the given isolation level (the
  // Java client's default is read_uncommitted) until `count` records came,
  // then 3 s more, so that extra records (duplicates) show too.
  static void read(String brokers, String topic, int count, String isolation) {
    Properties p = new Properties();
    p.put("bootstrap.servers", brokers);
    p.put("enable.auto.commit", "false");
    p.put("isolation.level", isolation);
    p.put("key.deserializer", StringDeserializer.class.getName());
    p.put("value.deserializer", ByteArrayDeserializer.class.getName());
    CloudEventDeserializer ce = new CloudEventDeserializer();
    int seen = 0;
    try (KafkaConsumer<String, byte[]> c = new KafkaConsumer<>(p)) {
      List<TopicPartition> parts = new ArrayList<>();
      c.partitionsFor(topic, Duration.ofSeconds(30))
          .forEach(i -> parts.add(new TopicPartition(topic, i.partition())));
      c.assign(parts);
      c.seekToBeginning(parts);
      long deadline = System.currentTimeMillis() + 60_000;
      long settled = Long.MAX_VALUE;
      while (System.currentTimeMillis() < Math.min(deadline, settled)) {
        if (seen >= count && settled == Long.MAX_VALUE) {
          settled = System.currentTimeMillis() + 3_000;
        }
        for (ConsumerRecord<String, byte[]> r : c.poll(Duration.ofMillis(500))) {
          CloudEvent ev;
          try {
            ev = ce.deserialize(r.topic(), r.headers(), r.value());
          } catch (RuntimeException e) {
            System.out.println("{\"error\":" + q(e.toString()) + ",\"offset\":" + r.offset() + "}");
            System.exit(3);
            return;
          }
          StringBuilder s = new StringBuilder("{");
          s.append("\"partition\":").append(r.partition());
          s.append(",\"key\":").append(q(r.key()));
          s.append(",\"specversion\":").append(q(ev.getSpecVersion().toString()));
          s.append(",\"id\":").append(q(ev.getId()));
          s.append(",\"type\":").append(q(ev.getType()));
          s.append(",\"source\":").append(q(ev.getSource().toString()));
          s.append(",\"time\":").append(q(ev.getTime() == null ? null : ev.getTime().toString()));
          s.append(",\"subject\":").append(q(ev.getSubject()));
          s.append(",\"datacontenttype\":").append(q(ev.getDataContentType()));
          s.append(",\"extensions\":{");
          String sep = "";
          for (String name : ev.getExtensionNames()) {
            s.append(sep).append(q(name)).append(":").append(q(String.valueOf(ev.getExtension(name))));
            sep = ",";
          }
          s.append("}");
          s.append(",\"data\":").append(q(ev.getData() == null ? null
              : new String(ev.getData().toBytes(), StandardCharsets.UTF_8)));
          System.out.println(s.append("}"));
          seen++;
        }
      }
    }
    if (seen < count) {
      System.err.println("read " + seen + " of " + count + " records within 60 s");
      System.exit(4);
    }
  }

  static void write(String brokers, String topic, int count, String type) throws Exception {
    Properties p = new Properties();
    p.put("bootstrap.servers", brokers);
    p.put("acks", "all");
    p.put("key.serializer", StringSerializer.class.getName());
    p.put("value.serializer", CloudEventSerializer.class.getName());
    try (KafkaProducer<String, CloudEvent> producer = new KafkaProducer<>(p)) {
      List<java.util.concurrent.Future<RecordMetadata>> sent = new ArrayList<>();
      List<String> ids = new ArrayList<>();
      for (int i = 0; i < count; i++) {
        String id = UUID.randomUUID().toString();
        CloudEvent ev = CloudEventBuilder.v1()
            .withId(id)
            .withType(type)
            .withSource(URI.create("urn:java-interop"))
            .withTime(OffsetDateTime.now())
            .withSubject("k" + (i % 10))
            .withDataContentType("application/json")
            .withData(("{\"seq\": " + i + "}").getBytes(StandardCharsets.UTF_8))
            .build();
        sent.add(producer.send(new ProducerRecord<>(topic, "k" + (i % 10), ev)));
        ids.add(id);
      }
      for (var f : sent) {
        f.get();
      }
      ids.forEach(System.out::println);
    }
  }

  static void partitions(String brokers, String topic, List<String> keys) throws Exception {
    Properties p = new Properties();
    p.put("bootstrap.servers", brokers);
    p.put("acks", "all");
    p.put("key.serializer", StringSerializer.class.getName());
    p.put("value.serializer", StringSerializer.class.getName());
    try (KafkaProducer<String, String> producer = new KafkaProducer<>(p)) {
      for (String key : keys) {
        RecordMetadata m = producer.send(new ProducerRecord<>(topic, key, "java")).get();
        System.out.println(key + "\t" + m.partition());
      }
    }
  }

  static String q(String s) {
    if (s == null) {
      return "null";
    }
    StringBuilder b = new StringBuilder("\"");
    for (char ch : s.toCharArray()) {
      switch (ch) {
        case '"' -> b.append("\\\"");
        case '\\' -> b.append("\\\\");
        case '\n' -> b.append("\\n");
        case '\r' -> b.append("\\r");
        case '\t' -> b.append("\\t");
        default -> {
          if (ch < 0x20) {
            b.append(String.format("\\u%04x", (int) ch));
          } else {
            b.append(ch);
          }
        }
      }
    }
    return b.append('"').toString();
  }
}
